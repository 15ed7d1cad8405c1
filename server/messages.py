"""OpenAI chat messages as the prompt builders take them: roles aliased, contents flattened, calls gathered."""

from __future__ import annotations

from server.errors import APIError
from server.protocol import ChatMessageIn
from tokenizer import ChatMessage
from tokenizer.call_pieces import FunctionCall
from tokenizer.json_values import JsonTooDeepError, loads_strict, walk

ROLE_ALIASES = {"developer": "system"}
MAX_ARGUMENT_DEPTH = 64  # nesting of a past call's arguments, which chat templates render (recursively)


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
    """A past call's arguments as the JSON value they spell (templates render them), else the text itself."""
    try:
        value = loads_strict(arguments)
    except JsonTooDeepError:
        value = None
    except ValueError:
        return arguments
    if value is None or any(len(path) > MAX_ARGUMENT_DEPTH for path, _ in walk(value)):
        raise APIError(400, f"tool call arguments may be nested at most {MAX_ARGUMENT_DEPTH} levels deep",
                       param="messages")
    return value
