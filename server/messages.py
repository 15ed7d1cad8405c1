"""OpenAI chat messages as the prompt builders take them: roles aliased, contents flattened, calls gathered."""

from __future__ import annotations

import json

from server.protocol import ChatMessageIn
from tokenizer import ChatMessage
from tokenizer.call_pieces import FunctionCall

ROLE_ALIASES = {"developer": "system"}


def role_of(message: ChatMessageIn) -> str:
    return ROLE_ALIASES.get(message.role, message.role)


def plain_messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    return [ChatMessage(role_of(m), m.text()) for m in messages]


def calls_of(message: ChatMessageIn) -> list[FunctionCall]:
    """An assistant message's calls: its ``tool_calls``, then a legacy ``function_call``."""
    calls = [FunctionCall(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    if message.function_call is not None:
        calls.append(FunctionCall(message.function_call.name, message.function_call.arguments))
    return calls


def template_message(message: ChatMessageIn) -> ChatMessage:
    """A message in the shape chat templates expect: calls with parsed arguments, results as ``tool``."""
    role = role_of(message)
    extra: dict[str, object] = {}
    calls = calls_of(message)
    if calls:
        extra["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": _json_or_text(
            c.arguments)}} for c in calls]
    if role == "function":
        role = "tool"
    if message.name:
        extra["name"] = message.name
    if message.tool_call_id:
        extra["tool_call_id"] = message.tool_call_id
    return ChatMessage(role, message.text(), extra)


def _json_or_text(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
