"""Replies under a grammar: ``response_format`` and required tool calls, for constrained decoding.

A JSON response format constrains the whole reply. A required call has its start pre-filled in the prompt
(``ToolPlan.prefix``); the model's tool-call format gives the grammar of the rest, built from the argument
grammars here (each schema checked and bounded first).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from engine.grammar import GrammarError, GrammarSpec, json_schema_grammar
from server.errors import APIError
from server.limits import Limits
from server.protocol import ChatCompletionRequest
from server.tools import ToolPlan
from tokenizer.react import Tool

ANY_OBJECT: dict[str, Any] = {"type": "object"}
UNSUPPORTED_KEYWORDS = frozenset({"not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                                  "unevaluatedProperties", "unevaluatedItems", "propertyNames"})
NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def reply_grammar(request: ChatCompletionRequest, plan: ToolPlan | None, limits: Limits) -> GrammarSpec | None:
    """The grammar the reply must follow, or None when it is free; raises a 400 ``APIError`` for a bad schema."""
    if plan is not None and plan.required:
        return plan.format.call_grammar(plan.tools, plan.forced, SchemaGrammars(limits))
    fmt = request.response_format
    if fmt is None or not fmt.structured:
        return None
    if fmt.json_schema is None:
        return _grammar(ANY_OBJECT, "response_format", limits)
    return _grammar(fmt.json_schema.schema_, "response_format.json_schema.schema", limits)


def check_tool_schemas(plan: ToolPlan, limits: Limits) -> None:
    """Every OpenAI-style parameter schema must be a valid JSON schema within the limits; Qwen's list form (shown to
    the model as text) within the same size and nesting bounds. Keywords a grammar cannot enforce are refused only
    where a grammar is built (a required call): a schema the model only reads may use any."""
    for tool in plan.tools:
        if isinstance(tool.parameters, dict):
            _valid(tool.parameters, f"tools[{tool.name}].parameters", limits, enforced=False)
        else:
            limits.check_schema(tool.parameters, f"tools[{tool.name}].parameters", enforced=False)


class SchemaGrammars:
    """Argument grammars under tool schemas, each schema checked against the limits first."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    def arguments(self, tool: Tool) -> GrammarSpec:
        schema = tool.parameters if isinstance(tool.parameters, dict) else ANY_OBJECT
        return _grammar(schema, f"tools[{tool.name}].parameters", self._limits)

    def value(self, tool: Tool, name: str, schema: Any) -> GrammarSpec:
        return _grammar(schema if isinstance(schema, dict) else {}, f"tools[{tool.name}].parameters.{name}",
                        self._limits)


def _grammar(schema: dict[str, Any], param: str, limits: Limits) -> GrammarSpec:
    try:
        return json_schema_grammar(json.dumps(_checked(schema, param, limits)))
    except GrammarError as exc:
        raise APIError(400, f"cannot constrain output to this schema: {exc}", param=param) from exc


def _checked(schema: dict[str, Any], param: str, limits: Limits) -> dict[str, Any]:
    """A valid schema within the limits whose every keyword a grammar can enforce."""
    _valid(schema, param, limits, enforced=True)
    unsupported = sorted(_keywords(schema) & UNSUPPORTED_KEYWORDS)
    if unsupported:
        raise APIError(400, f"unsupported JSON schema keywords: {', '.join(unsupported)}", param=param)
    return schema


def _valid(schema: dict[str, Any], param: str, limits: Limits, *, enforced: bool) -> None:
    limits.check_schema(schema, param, enforced=enforced)
    if not isinstance(schema.get("$schema", ""), str):
        raise APIError(400, "invalid JSON schema: $schema must be a string (a metaschema URI)", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"invalid JSON schema: {exc.message}", param=param) from exc
    except (RecursionError, ValueError, TypeError, LookupError) as exc:  # a metaschema that cannot be resolved
        raise APIError(400, f"invalid JSON schema: {type(exc).__name__}", param=param) from exc


def _keywords(schema: Any) -> set[str]:
    """Every keyword used anywhere in ``schema`` (property names are not keywords)."""
    if isinstance(schema, list):
        return set().union(*map(_keywords, schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key, value in schema.items():
        if key in NAMED_SCHEMAS and isinstance(value, dict):
            found |= set().union(*map(_keywords, value.values())) if value else set()
        elif key not in ("enum", "const", "default", "examples", "required"):
            found |= _keywords(value)
    return found
