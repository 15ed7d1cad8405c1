"""Qwen's ReAct prompt (Qwen-1's ``openai_api.py``): tools described in the first user turn, one call per reply as
``Action: name`` / ``Action Input: {...}``, the result fed back as ``Observation:``."""

from __future__ import annotations

from collections.abc import Sequence

from engine.grammar import Concat, GrammarSpec, Union, literal_grammar
from server.errors import APIError
from server.messages import calls_of, role_of
from server.protocol import ChatMessageIn
from server.tool_formats.base import ArgumentGrammars, ToolFormat
from tokenizer import ChatMessage
from tokenizer.react import (
    STOP_STRINGS,
    ReactError,
    ReactInput,
    ReplyStreamParser,
    Tool,
    forced_call_prefix,
    react_messages,
)


class ReactFormat(ToolFormat):
    name = "react"
    stop_strings = STOP_STRINGS

    def turns(self, messages: Sequence[ChatMessageIn], tools: Sequence[Tool],
              prefix: str) -> tuple[list[ChatMessage], bool]:
        inputs = [ReactInput(role_of(m), m.text(), tuple(calls_of(m))) for m in messages]
        try:
            turns, open_last = react_messages(inputs, tools)
        except ReactError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        if not prefix:
            return turns, open_last
        if open_last:  # the history ends in an observation: the required call follows its "Thought:"
            last = turns[-1].content.removesuffix("Thought:").rstrip("\n")
            turns[-1] = ChatMessage("assistant", f"{last}\n{prefix}")
        else:
            turns.append(ChatMessage("assistant", prefix))
        return turns, True

    def call_prefix(self, forced: str | None) -> str:
        return forced_call_prefix(forced)

    def call_grammar(self, tools: Sequence[Tool], forced: str | None, grammars: ArgumentGrammars) -> GrammarSpec:
        if forced is not None:  # after "Action: name\nAction Input:"
            tool = next(t for t in tools if t.name == forced)
            return Concat((literal_grammar(" "), grammars.arguments(tool)))
        return Union(tuple(Concat((literal_grammar(f" {tool.name}\nAction Input: "), grammars.arguments(tool)))
                           for tool in tools))

    def stream_parser(self, tools: Sequence[Tool], prefix: str) -> ReplyStreamParser:
        return ReplyStreamParser(prefix)
