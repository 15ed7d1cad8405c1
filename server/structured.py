"""Replies that must be JSON: ``response_format`` and required tool calls, as grammars for constrained decoding.

A JSON response format constrains the whole reply. A required call has its start pre-filled in the prompt
(``ToolPlan.prefix``); the grammar then covers the rest: the function's name when the choice is open, and
arguments valid under that function's parameter schema (in the ReAct or the native ``<tool_call>`` format).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import xgrammar as xgr

from engine.grammar import GrammarError, json_schema_grammar, literal_grammar
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.tools import ToolPlan
from tokenizer.react import Tool
from tokenizer.tool_calls import CLOSE

ANY_OBJECT: dict[str, Any] = {"type": "object"}
UNSUPPORTED_KEYWORDS = frozenset({"not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                                  "unevaluatedProperties", "unevaluatedItems", "propertyNames"})
NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def reply_grammar(request: ChatCompletionRequest, plan: ToolPlan | None) -> xgr.Grammar | None:
    """The grammar the reply must follow, or None when it is free; raises a 400 ``APIError`` for a bad schema."""
    if plan is not None and plan.required:
        return _call_grammar(plan)
    fmt = request.response_format
    if fmt is None or not fmt.structured:
        return None
    if fmt.json_schema is None:
        return _grammar(ANY_OBJECT, "response_format")
    return _grammar(fmt.json_schema.schema_, "response_format.json_schema.schema")


def check_tool_schemas(plan: ToolPlan) -> None:
    """Every OpenAI-style parameter schema must be a valid JSON schema (Qwen's list form is free text)."""
    for tool in plan.tools:
        if isinstance(tool.parameters, dict):
            _checked(tool.parameters, f"tools[{tool.name}].parameters")


def _call_grammar(plan: ToolPlan) -> xgr.Grammar:
    tools = [_tool(plan, plan.forced)] if plan.forced is not None else plan.tools
    if plan.native:  # after the pre-filled "<tool_call>\n": one call object, then the block closes
        return xgr.Grammar.union(*[xgr.Grammar.concat(
            literal_grammar(f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": '),
            _arguments(tool), literal_grammar(f"}}\n{CLOSE}")) for tool in tools])
    if plan.forced is not None:  # after "Action: name\nAction Input:"
        return xgr.Grammar.concat(literal_grammar(" "), _arguments(tools[0]))
    return xgr.Grammar.union(*[
        xgr.Grammar.concat(literal_grammar(f" {tool.name}\nAction Input: "), _arguments(tool)) for tool in tools
    ])


def _tool(plan: ToolPlan, name: str) -> Tool:
    return next(tool for tool in plan.tools if tool.name == name)


def _arguments(tool: Tool) -> xgr.Grammar:
    schema = tool.parameters if isinstance(tool.parameters, dict) else ANY_OBJECT
    return _grammar(schema, f"tools[{tool.name}].parameters")


def _grammar(schema: dict[str, Any], param: str) -> xgr.Grammar:
    try:
        return json_schema_grammar(json.dumps(_checked(schema, param)))
    except GrammarError as exc:
        raise APIError(400, f"cannot constrain output to this schema: {exc}", param=param) from exc


def _checked(schema: dict[str, Any], param: str) -> dict[str, Any]:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"invalid JSON schema: {exc.message}", param=param) from exc
    unsupported = sorted(_keywords(schema) & UNSUPPORTED_KEYWORDS)
    if unsupported:
        raise APIError(400, f"unsupported JSON schema keywords: {', '.join(unsupported)}", param=param)
    return schema


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
