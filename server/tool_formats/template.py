"""Formats whose prompt is the model's own chat template: it gets the tools and the history's calls and results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from server.errors import APIError
from server.messages import calls_of, template_message
from server.protocol import ChatMessageIn
from server.tool_formats.base import ToolFormat
from tokenizer import ChatMessage, Tokenizer
from tokenizer.react import Tool


class TemplateToolFormat(ToolFormat):
    """The prompt side shared by formats that a chat template renders; subclasses read the replies."""

    def turns(self, messages: Sequence[ChatMessageIn], tools: Sequence[Tool],
              prefix: str) -> tuple[list[ChatMessage], bool]:
        turns = [template_message(m) for m in messages]
        if prefix:
            turns.append(ChatMessage("assistant", prefix))
        return turns, bool(prefix)

    def template_kwargs(self, tools: Sequence[Tool]) -> dict[str, Any]:
        if not tools:
            return {}
        return {"tools": [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                              "parameters": t.parameters}} for t in tools]}

    def check_no_control_tokens(self, tokenizer: Tokenizer, messages: Sequence[ChatMessageIn],
                                tools: Sequence[Tool]) -> None:
        """A chat template renders tools and calls as its own text, where a special token's surface form would
        become a control token: refuse them there (message contents are always encoded as plain text)."""
        calls = [[c.name, c.arguments] for m in messages for c in calls_of(m)]
        names = [m.name for m in messages if m.name] + [m.tool_call_id for m in messages if m.tool_call_id]
        rendered = json.dumps([self.template_kwargs(tools), calls, names], ensure_ascii=False)
        found = [s for s in tokenizer.special_tokens if s in rendered]
        if found:
            raise APIError(400, f"tools and tool calls may not contain the control token {found[0]!r}",
                           param="tools")
