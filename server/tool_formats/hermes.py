"""Hermes-style calls, the Qwen2 / Qwen2.5 / Qwen3 templates' format: ``<tool_call>`` blocks holding
``{"name": ..., "arguments": {...}}``, several per reply."""

from __future__ import annotations

import json
from collections.abc import Sequence

from engine.grammar import Concat, GrammarSpec, Union, literal_grammar
from server.tool_formats.base import ArgumentGrammars
from server.tool_formats.template import TemplateToolFormat
from tokenizer.react import Tool
from tokenizer.tool_calls import CLOSE, OPEN, ToolCallStreamParser


class HermesFormat(TemplateToolFormat):
    name = "hermes"

    def call_prefix(self, forced: str | None) -> str:
        return f"{OPEN}\n"

    def call_grammar(self, tools: Sequence[Tool], forced: str | None, grammars: ArgumentGrammars) -> GrammarSpec:
        chosen = [t for t in tools if forced is None or t.name == forced]
        return Union(tuple(Concat((
            literal_grammar(f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": '),
            grammars.arguments(tool), literal_grammar(f"}}\n{CLOSE}"))) for tool in chosen))

    def stream_parser(self, tools: Sequence[Tool], prefix: str) -> ToolCallStreamParser:
        return ToolCallStreamParser(prefix)
