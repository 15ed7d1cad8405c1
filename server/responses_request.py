"""The OpenAI Responses API's request, and its translation into the chat request that ``server.chat_plan`` plans:
``instructions`` and ``input`` items become chat messages, flat function tools become chat tools, ``text.format``
becomes ``response_format`` and ``reasoning.effort`` turns thinking on or off. Tool types this server cannot run
(``web_search``, ``custom``, ``namespace``, ...) and input items of other kinds are skipped, never refused."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from server.errors import APIError, invalid_field
from server.protocol import (
    MAX_INT,
    SEED_LIMIT,
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
MAX_METADATA = 16  # OpenAI's bound on metadata entries
IMAGE_PARTS = frozenset({"input_image", "input_file", "input_audio"})
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
THINKING_OFF = frozenset({"none", "minimal"})


class ContentPart(Request):
    """A part of a message's content (``input_text``, ``output_text``, ...), or of a call's output."""

    type: Kind
    text: Text | None = None
    refusal: Text | None = None

    def plain(self) -> str | None:
        """The part's text; None for a part with no text (a reasoning summary, ...)."""
        if self.type in IMAGE_PARTS:
            raise APIError(400, f"input: {self.type} parts are not supported; this server serves a text-only model",
                           param="input", code="unsupported_content")
        if self.type not in TEXT_PARTS:
            return None
        return self.text if self.text is not None else self.refusal or ""


Content = Text | Annotated[list[ContentPart], items()]


class InputItem(Request):
    """One ``input`` item: a message (``type`` may be left out), a ``function_call``, a ``function_call_output``,
    or another kind that is skipped (``reasoning``, ``item_reference``, hosted tools' calls)."""

    type: Kind = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: Content | None = None
    call_id: Identifier | None = None
    name: Identifier | None = None
    arguments: Text | None = None
    output: Content | None = None


class FunctionTool(Request):
    """A ``tools`` entry: a flat ``function`` tool, or a tool type this server skips."""

    type: Kind
    name: Identifier | None = None
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceObject(Request):
    type: Kind
    name: Identifier | None = None


class TextFormat(Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Identifier = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Request):
    format: TextFormat | None = None


class ReasoningConfig(Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class ResponsesRequest(Request):
    """``POST /v1/responses``; unknown fields are ignored (logged at debug)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Identifier
    input: Text | Annotated[list[InputItem], items()] = Field(default_factory=list)
    instructions: Text | None = None
    tools: Annotated[list[FunctionTool], items()] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: Probability | None = None
    stop: Annotated[list[Text], items()] | Text | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    metadata: dict[Identifier, Annotated[str, Field(max_length=512)]] | None = Field(default=None,
                                                                                      max_length=MAX_METADATA)
    store: bool = True
    previous_response_id: Identifier | None = None
    stream: bool = False
    user: Identifier | None = None

    def function_tools(self) -> list[FunctionTool]:
        """The tools a reply may call; the others are skipped (logged)."""
        kept = [tool for tool in self.tools if tool.type == "function" and tool.name]
        skipped = sorted({tool.type for tool in self.tools if tool.type != "function" or not tool.name})
        if skipped:
            log.info("responses: skipped tools this server cannot run: %s", ", ".join(skipped))
        return kept

    def thinking(self) -> bool | None:
        """Whether ``reasoning.effort`` turns thinking on or off; None leaves the server's default."""
        effort = self.reasoning.effort if self.reasoning else None
        return None if effort is None else effort not in THINKING_OFF


def conversation(body: ResponsesRequest, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of the conversation so far (a stored ``history`` first, then ``input``), without the
    instructions; each ``function_call_output`` answers a call made before it. Linear in the items."""
    messages = [{**m, "tool_calls": list(m["tool_calls"])} if "tool_calls" in m else dict(m) for m in history]
    calls = {call["id"]: call["function"]["name"] for m in messages for call in m.get("tool_calls", [])}
    entries = [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for index, entry in enumerate(entries):
        if entry.type == "message":
            if entry.role is None:
                raise APIError(400, f"input[{index}]: a message needs a role", param=f"input.{index}.role")
            messages.append({"role": entry.role, "content": _text(entry.content)})
        elif entry.type == "function_call":
            if not entry.name or entry.call_id is None:
                raise APIError(400, f"input[{index}]: a function_call needs a name and a call_id",
                               param=f"input.{index}")
            _add_call(messages, entry.call_id, entry.name, entry.arguments or "")
            calls[entry.call_id] = entry.name
        elif entry.type == "function_call_output":
            if entry.call_id not in calls:
                raise APIError(400, f"input[{index}]: no function_call with call_id {str(entry.call_id)[:80]!r} "
                                    "precedes this function_call_output", param=f"input.{index}.call_id")
            messages.append({"role": "tool", "tool_call_id": entry.call_id, "name": calls[entry.call_id],
                             "content": _text(entry.output)})
        else:
            log.debug("responses: skipped an input item of type %s", entry.type)
    return messages


def to_chat(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that runs ``body`` over ``messages`` (``conversation``)."""
    log_ignored("responses", body)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools = body.function_tools()
    chat: dict[str, Any] = {
        "model": body.model, "messages": system + messages, "max_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stop or [],
        "parallel_tool_calls": body.parallel_tool_calls, "user": body.user,
    }
    if tools:
        chat["tools"] = [{"type": "function", "function": {
            "name": tool.name, "description": tool.description or "",
            **({"parameters": tool.parameters} if tool.parameters is not None else {})}} for tool in tools]
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    thinking = body.thinking()
    if thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": thinking}
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_ or {}, "strict": fmt.strict}}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise invalid_field(errors[0]) from None


def _text(content: Content | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(text for part in content if (text := part.plain()) is not None)


def _add_call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str) -> None:
    """Add a call to the assistant turn that ends ``messages`` (opening one if none does)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _tool_choice(choice: str | ToolChoiceObject | None) -> Any:
    if isinstance(choice, ToolChoiceObject):
        if choice.type == "function" and choice.name:
            return {"type": "function", "function": {"name": choice.name}}
        return "auto"  # a hosted tool, or an allowed-tools list: every kept tool stays callable
    return choice
