"""The Anthropic Messages API's request, and its translation into the chat request that ``server.chat_plan`` plans:
``system`` (and ``system`` entries inside ``messages``) becomes the system prompt, ``tool_use`` blocks become an
assistant turn's calls and ``tool_result`` blocks the tool turns that answer them, ``tool_choice`` and ``thinking``
map onto their chat counterparts. Blocks given back that the prompt does not carry (``thinking``,
``redacted_thinking``) are accepted and left out; images and documents are refused (text-only models)."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from server.errors import APIError, invalid_field
from server.protocol import (
    MAX_INT,
    ChatCompletionRequest,
    Identifier,
    Kind,
    Probability,
    Request,
    Text,
    items,
    log_ignored,
)

log = logging.getLogger("qwen_serve")
MEDIA_BLOCKS = frozenset({"image", "document"})
CLIENT_TOOLS = (None, "custom")


class ResultPart(Request):
    """A block inside a ``tool_result``'s content."""

    type: Kind
    text: Text | None = None


class ContentBlock(Request):
    type: Kind
    text: Text | None = None
    id: Identifier | None = None
    name: Identifier | None = None
    input: dict[str, Any] | None = None
    tool_use_id: Identifier | None = None
    content: Text | Annotated[list[ResultPart], items()] | None = None
    is_error: bool = False


class MessageIn(Request):
    role: Literal["user", "assistant", "system"]
    content: Text | Annotated[list[ContentBlock], items()]


class SystemBlock(Request):
    type: Kind = "text"
    text: Text


class ToolIn(Request):
    """A client tool (``name``, ``description``, ``input_schema``); typed server tools (``web_search_...``,
    ``bash_...``) are skipped."""

    type: Kind | None = None
    name: Identifier
    description: Text | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolChoiceIn(Request):
    type: Literal["auto", "any", "tool", "none"]
    name: Identifier | None = None
    disable_parallel_tool_use: bool = False


class ThinkingIn(Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)


class OutputFormat(Request):
    type: Literal["json_schema"] = "json_schema"
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Request):
    """``output_config``: its ``format`` constrains the reply to a JSON schema (``effort`` is ignored)."""

    format: OutputFormat | None = None


class CountTokensRequest(Request):
    """``POST /v1/messages/count_tokens``: a conversation without sampling fields."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Identifier
    messages: list[MessageIn] = Field(min_length=1, max_length=1 << 14, fail_fast=True)
    system: Text | Annotated[list[SystemBlock], items()] | None = None
    tools: Annotated[list[ToolIn], items()] = Field(default_factory=list)
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``; ``max_tokens`` is required, as Anthropic requires it. Unknown fields (``metadata``,
    ``context_management``, ...) are ignored (logged at debug)."""

    max_tokens: int = Field(ge=1, le=MAX_INT)
    stop_sequences: Annotated[list[Text], items()] = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: Probability | None = None
    top_k: int | None = Field(default=None, ge=0, le=MAX_INT)
    output_config: OutputConfig | None = None
    stream: bool = False


def to_chat(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that runs ``body``."""
    log_ignored("messages", body)
    system = [body.system] if isinstance(body.system, str) else [b.text for b in body.system or []]
    messages: list[dict[str, Any]] = []
    calls: dict[str, str] = {}
    for index, message in enumerate(body.messages):
        if message.role == "system":
            system.append(_texts(message.content, index))
        elif message.role == "assistant":
            messages.append(_assistant(message, index, calls))
        else:
            messages += _user(message, index, calls)
    chat: dict[str, Any] = {"model": body.model, "messages": messages}
    if any(system):
        chat["messages"] = [{"role": "system", "content": "\n\n".join(s for s in system if s)}, *messages]
    tools = [tool for tool in body.tools if tool.type in CLIENT_TOOLS]
    skipped = sorted({str(tool.type) for tool in body.tools if tool.type not in CLIENT_TOOLS})
    if skipped:
        log.info("messages: skipped server tools: %s", ", ".join(skipped))
    if tools:
        chat["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.input_schema}} for t in tools]
        chat["tool_choice"], chat["parallel_tool_calls"] = _tool_choice(body.tool_choice)
    if body.thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": body.thinking.type != "disabled"}
    if isinstance(body, MessagesRequest):
        chat |= {"max_tokens": body.max_tokens, "stop": body.stop_sequences, "temperature": body.temperature,
                 "top_p": body.top_p, "top_k": body.top_k}
        fmt = body.output_config.format if body.output_config else None
        if fmt is not None:
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        raise invalid_field(exc.errors(include_url=False, include_input=False)[0]) from None


def _texts(content: str | list[ContentBlock] | list[ResultPart], index: int) -> str:
    """The text blocks of a content, joined; other blocks (``thinking`` given back, ...) are left out, media
    refused."""
    if isinstance(content, str):
        return content
    for block in content:
        if block.type in MEDIA_BLOCKS:
            raise APIError(400, f"messages.{index}: {block.type} blocks are not supported; this server serves a "
                                "text-only model", param=f"messages.{index}.content")
    return "".join(block.text or "" for block in content if block.type == "text")


def _assistant(message: MessageIn, index: int, calls: dict[str, str]) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": _texts(message.content, index)}
    uses = [] if isinstance(message.content, str) else [b for b in message.content if b.type == "tool_use"]
    for block in uses:
        if block.id is None or not block.name:
            raise APIError(400, f"messages.{index}: a tool_use block needs an id and a name",
                           param=f"messages.{index}.content")
        calls[block.id] = block.name
    if uses:
        turn["tool_calls"] = [{"id": b.id, "type": "function", "function": {
            "name": b.name, "arguments": json.dumps(b.input or {}, ensure_ascii=False)}} for b in uses]
    return turn


def _user(message: MessageIn, index: int, calls: dict[str, str]) -> list[dict[str, Any]]:
    """A user message's tool results (each a tool turn) and then its text."""
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    turns = []
    for block in message.content:
        if block.type != "tool_result":
            continue
        if block.tool_use_id not in calls:
            raise APIError(400, f"messages.{index}: tool_result refers to tool_use id "
                                f"{str(block.tool_use_id)[:80]!r}, which no earlier assistant turn made",
                           param=f"messages.{index}.content")
        result = _texts(block.content or "", index)
        turns.append({"role": "tool", "tool_call_id": block.tool_use_id, "name": calls[block.tool_use_id],
                      "content": f"Error: {result}" if block.is_error else result})
    text = _texts(message.content, index)
    if text or not turns:
        turns.append({"role": "user", "content": text})
    return turns


def _tool_choice(choice: ToolChoiceIn | None) -> tuple[Any, bool]:
    """Chat's ``tool_choice`` and ``parallel_tool_calls``."""
    if choice is None:
        return "auto", True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"any": "required"}.get(choice.type, choice.type), parallel
