"""Formats whose prompt is the model's own chat template: it gets the tools and the history's calls and results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.messages import template_message
from server.protocol import ChatMessageIn
from server.tool_formats.base import ToolFormat
from tokenizer import ChatMessage
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
