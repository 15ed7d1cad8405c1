"""Qwen3-Coder's XML calls: ``<tool_call><function=name><parameter=p>value</parameter>...</function></tool_call>``,
several per reply, values converted by their schema (``tokenizer.xml_tool_calls``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.grammar import Concat, GrammarSpec, RegexGrammar, Union, literal_grammar
from server.errors import APIError
from server.tool_formats.base import ArgumentGrammars
from server.tool_formats.template import TemplateToolFormat
from tokenizer.react import Tool
from tokenizer.xml_tool_calls import (
    CLOSE,
    FUNCTION,
    MAX_NAME,
    OPEN,
    PARAMETER,
    PARAMETER_END,
    XmlToolCallStreamParser,
)

TEXT_VALUE = "[^<]*"  # a text parameter under a grammar: anything up to the next tag


class Qwen3CoderFormat(TemplateToolFormat):
    name = "qwen3_coder"

    def check_tools(self, tools: Sequence[Tool]) -> None:
        """XML has no escapes here: a parameter name is the text between ``<parameter=`` and ``>`` on one line, and
        a text value ends at the next tag. Names that break that, and enum values that hold a ``<`` or start or
        end with a line break, cannot be written: refused."""
        for tool in tools:
            for name, schema in _properties(tool):
                if not name or name != name.strip() or any(c in name for c in "<>\r\n") or len(name) > MAX_NAME:
                    raise APIError(400, f"tool {tool.name}: parameter name {name[:80]!r} cannot be written in XML "
                                        "calls (no <, >, line breaks or outer spaces; 1 to 256 characters)",
                                   param="tools")
                choices = schema.get("enum") if isinstance(schema, dict) else None
                for choice in choices if isinstance(choices, list) else ():
                    if isinstance(choice, str) and ("<" in choice or choice != choice.strip("\r\n")):
                        raise APIError(400, f"tool {tool.name}: enum value {choice[:80]!r} of {name!r} cannot be "
                                            "written in XML calls (no < and no line break at either end)",
                                       param="tools")

    def call_prefix(self, forced: str | None) -> str:
        return f"{OPEN}\n" + (f"{FUNCTION}{forced}>\n" if forced is not None else "")

    def call_grammar(self, tools: Sequence[Tool], forced: str | None, grammars: ArgumentGrammars) -> GrammarSpec:
        def call(tool: Tool) -> GrammarSpec:
            opening = () if forced is not None else (literal_grammar(f"{FUNCTION}{tool.name}>\n"),)
            parameters = tuple(_parameter(tool, name, schema, grammars) for name, schema in _properties(tool))
            return Concat((*opening, *parameters, literal_grammar(f"</function>\n{CLOSE}")))

        return Union(tuple(call(t) for t in tools if forced is None or t.name == forced))

    def stream_parser(self, tools: Sequence[Tool], prefix: str) -> XmlToolCallStreamParser:
        return XmlToolCallStreamParser({t.name: t.parameters for t in tools}, prefix)


def _properties(tool: Tool) -> list[tuple[str, Any]]:
    schema = tool.parameters if isinstance(tool.parameters, dict) else {}
    properties = schema.get("properties") or {}
    return list(properties.items())


def _parameter(tool: Tool, name: str, schema: Any, grammars: ArgumentGrammars) -> GrammarSpec:
    """One ``<parameter=name>`` element; optional unless the schema requires it."""
    element = Concat((literal_grammar(f"{PARAMETER}{name}>\n"), _value(tool, name, schema, grammars),
                      literal_grammar(f"\n{PARAMETER_END}\n")))
    required = tool.parameters.get("required", []) if isinstance(tool.parameters, dict) else []
    return element if name in required else Union((literal_grammar(""), element))


def _value(tool: Tool, name: str, schema: Any, grammars: ArgumentGrammars) -> GrammarSpec:
    """Text for string parameters (an enum: one of its values), else compact JSON under the schema."""
    schema = schema if isinstance(schema, dict) else {}
    choices = schema.get("enum")
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return Union(tuple(literal_grammar(c) for c in choices))
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not kinds or "string" in kinds:
        return RegexGrammar(TEXT_VALUE)
    return grammars.value(tool, name, schema)
