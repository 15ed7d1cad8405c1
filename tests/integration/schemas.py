"""Twenty JSON schemas of the kinds people constrain replies and tool arguments with: flat and nested objects,
arrays, enums, numbers with bounds, optional fields, unions and references."""

from __future__ import annotations

from typing import Any


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


NAME = {"type": "string", "maxLength": 24}
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "city": ("Which city is the capital of Germany?", obj({"city": NAME})),
    "person": ("Describe a person called Ann who is 31.", obj({"name": NAME, "age": {"type": "integer"}})),
    "optional_unit": ("What's the weather like in Boston?",
                      obj({"location": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["location"])),
    "boolean": ("Is the sky blue?", obj({"answer": {"type": "boolean"}})),
    "bounded_number": ("Rate pizza from 0 to 10.", obj({"score": {"type": "number", "minimum": 0, "maximum": 10}})),
    "integer_range": ("Pick a dice roll.", obj({"roll": {"type": "integer", "minimum": 1, "maximum": 6}})),
    "enum_only": ("What color is grass?", obj({"color": {"enum": ["red", "green", "blue"]}})),
    "string_array": ("List three fruits.", obj({"fruits": {"type": "array", "items": NAME, "maxItems": 3}})),
    "number_array": ("Give the first primes.",
                     obj({"primes": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5}})),
    "nested": ("Where does Bob live?",
               obj({"name": NAME, "address": obj({"city": NAME, "zip": {"type": "string", "pattern": "[0-9]{5}"}})})),
    "array_of_objects": ("List two books with their years.",
                         obj({"books": {"type": "array", "maxItems": 2,
                                        "items": obj({"title": NAME, "year": {"type": "integer"}})}})),
    "nullable": ("Who is the king of France today?", obj({"king": {"anyOf": [NAME, {"type": "null"}]}})),
    "const": ("Say which API version you use.", obj({"version": {"const": "v1"}, "note": NAME}, ["version"])),
    "all_optional": ("Tell me about Paris.", obj({"country": NAME, "population": {"type": "integer"}}, [])),
    "enum_array": ("Which days are weekend days?",
                   obj({"days": {"type": "array", "maxItems": 2,
                                 "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}}})),
    "deep": ("Describe a company with its CEO.",
             obj({"company": obj({"name": NAME, "ceo": obj({"name": NAME, "age": {"type": "integer"}})})})),
    "ref": ("Give a start and end point.",
            {"type": "object", "$defs": {"point": obj({"x": {"type": "number"}, "y": {"type": "number"}})},
             "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
             "required": ["start", "end"]}),
    "mixed_types": ("Summarise an order.",
                    obj({"id": {"type": "integer"}, "paid": {"type": "boolean"}, "total": {"type": "number"},
                         "items": {"type": "array", "items": NAME, "maxItems": 3}})),
    "one_of": ("Give me a shape.", obj({"shape": {"oneOf": [obj({"radius": {"type": "number"}}),
                                                             obj({"side": {"type": "number"}})]}})),
    "tags": ("Tag this post about cooking pasta.",
             obj({"title": NAME, "tags": {"type": "array", "items": {"enum": ["food", "travel", "tech"]},
                                          "maxItems": 2}, "draft": {"type": "boolean"}}, ["title", "tags"])),
}
