"""OpenAI tools and legacy functions onto the prompt, and the model's replies back into calls.

Two formats: the model's own chat template when it renders ``tools`` (the Qwen2 family: ``<tool_call>`` blocks,
several calls per reply), else Qwen's ReAct prompt (Qwen-1 and templates without tools: one call per reply).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.errors import APIError
from server.protocol import (
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageIn,
    ChatMessageOut,
    FunctionCallOut,
    FunctionDelta,
    ToolCallDelta,
    ToolCallOut,
)
from tokenizer import ChatMessage, Tokenizer
from tokenizer.react import (
    STOP_STRINGS,
    FunctionCall,
    ReactError,
    ReactInput,
    ReplyDelta,
    ReplyStreamParser,
    Tool,
    forced_call_prefix,
    parse_reply,
    react_messages,
)
from tokenizer.tool_calls import OPEN, CallDelta, ToolCallStreamParser, parse_tool_calls

ROLE_ALIASES = {"developer": "system"}


def plain_messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    return [ChatMessage(ROLE_ALIASES.get(m.role, m.role), m.text()) for m in messages]


@dataclass
class ToolPlan:
    """How one request uses functions: those in the prompt, whether it must call one (and which), and the
    answer's shape."""

    tools: list[Tool]
    required: bool
    forced: str | None
    legacy: bool
    native: bool = False
    single_call: bool = False

    @property
    def prefix(self) -> str:
        """Reply text put in the prompt: the opening of a required call."""
        if not self.required:
            return ""
        return f"{OPEN}\n" if self.native else forced_call_prefix(self.forced)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.native else STOP_STRINGS

    @property
    def template_kwargs(self) -> dict[str, object]:
        """What the chat template gets besides the messages: the tools, in OpenAI's shape."""
        if not self.native or not self.tools:
            return {}
        return {"tools": [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                              "parameters": t.parameters}} for t in self.tools]}

    @staticmethod
    def of(request: ChatCompletionRequest, native: bool = False) -> ToolPlan | None:
        """None when neither the request nor its conversation involves functions. ``native``: the model's chat
        template renders tools."""
        in_history = any(m.role in ("tool", "function") or m.tool_calls or m.function_call for m in request.messages)
        if not request.function_specs and not in_history:
            return None
        tools = []
        if request.calls_allowed:
            try:
                tools = [Tool.from_function(spec.model_dump()) for spec in request.function_specs]
            except ReactError as exc:
                raise APIError(400, str(exc), param="tools") from exc
        return ToolPlan(tools, request.call_required, request.forced_function, request.legacy_functions, native,
                        single_call=request.legacy_functions or not request.parallel_tool_calls)

    def check_no_control_tokens(self, tokenizer: Tokenizer, messages: list[ChatMessageIn]) -> None:
        """A chat template renders tools and calls as its own text, where a special token's surface form would
        become a control token: refuse them there (message contents are always encoded as plain text)."""
        if not self.native:
            return
        calls = [c.function.model_dump() for m in messages for c in m.tool_calls or []]
        calls += [m.function_call.model_dump() for m in messages if m.function_call is not None]
        names = [m.name for m in messages if m.name] + [m.tool_call_id for m in messages if m.tool_call_id]
        rendered = json.dumps([self.template_kwargs, calls, names], ensure_ascii=False)
        found = [s for s in tokenizer.special_tokens if s in rendered]
        if found:
            raise APIError(400, f"tools and tool calls may not contain the control token {found[0]!r}",
                           param="tools")

    def messages(self, messages: list[ChatMessageIn]) -> tuple[list[ChatMessage], bool]:
        """The conversation as the prompt's turns, and whether the last assistant turn is left open."""
        if self.native:
            turns = [native_message(m) for m in messages]
            if self.required:
                turns.append(ChatMessage("assistant", self.prefix))
            return turns, self.required
        inputs = []
        for m in messages:
            calls = [FunctionCall(c.function.name, c.function.arguments) for c in m.tool_calls or []]
            if m.function_call is not None:
                calls.append(FunctionCall(m.function_call.name, m.function_call.arguments))
            inputs.append(ReactInput(ROLE_ALIASES.get(m.role, m.role), m.text(), tuple(calls)))
        try:
            turns, open_last = react_messages(inputs, self.tools)
        except ReactError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        if self.required:
            if open_last:
                last = turns[-1].content.removesuffix("Thought:").rstrip("\n")
                turns[-1] = ChatMessage("assistant", f"{last}\n{self.prefix}")
            else:
                turns.append(ChatMessage("assistant", self.prefix))
            open_last = True
        return turns, open_last

    def message(self, text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
        """A whole reply as an OpenAI message and its finish reason."""
        if self.native:
            native = parse_tool_calls(self.prefix + text)
            content, calls = native.content, list(native.calls)
        else:
            reply = parse_reply(self.prefix + text)
            content, calls = reply.content, [reply.call] if reply.call else []
        if not calls:
            return ChatMessageOut(content=content), finish_reason
        outs = [FunctionCallOut(name=c.name, arguments=c.arguments) for c in calls[: 1 if self.single_call else None]]
        if self.legacy:
            out = ChatMessageOut(content=content or None, function_call=outs[0])
        else:
            out = ChatMessageOut(content=content or None,
                                 tool_calls=[ToolCallOut(id=call_id(), function=call) for call in outs])
        return out, self.finish_reason_for(finish_reason)

    def finish_reason_for(self, finish_reason: str | None) -> str | None:
        """The reason a reply that made a call ended: the call, unless it was cut by the length limit."""
        if finish_reason == "length":
            return finish_reason
        return "function_call" if self.legacy else "tool_calls"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def native_message(message: ChatMessageIn) -> ChatMessage:
    """An OpenAI message in the shape chat templates expect: calls with parsed arguments, results as ``tool``."""
    role = ROLE_ALIASES.get(message.role, message.role)
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    if message.function_call is not None:
        calls.append((message.function_call.name, message.function_call.arguments))
    extra: dict[str, object] = {}
    if calls:
        extra["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": _json_or_text(args)}}
                               for name, args in calls]
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


@dataclass
class StreamedReply:
    """One choice's streamed reply: text in, OpenAI deltas out."""

    plan: ToolPlan
    parser: ReplyStreamParser | ToolCallStreamParser = field(init=False)
    called: bool = False

    def __post_init__(self) -> None:
        prefix = self.plan.prefix
        self.parser = ToolCallStreamParser(prefix) if self.plan.native else ReplyStreamParser(prefix)

    def feed(self, text: str) -> list[ChatDelta]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        deltas = self._deltas(self.parser.finish())
        return deltas, self.plan.finish_reason_for(finish_reason) if self.called else finish_reason

    def _deltas(self, pieces: list[ReplyDelta] | list[CallDelta]) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        for piece in pieces:
            if isinstance(piece, CallDelta):
                if piece.call is None:
                    out.append(ChatDelta(content=piece.content))
                elif not (self.plan.single_call and self.called):  # legacy, or parallel_tool_calls false
                    out.append(self._header(piece.call.name, piece.index))
                    out.append(self._arguments(piece.call.arguments, piece.index))
            else:
                out.append(self._delta(piece))
        return out

    def _header(self, name: str, index: int) -> ChatDelta:
        self.called = True
        if self.plan.legacy:
            return ChatDelta(function_call=FunctionDelta(name=name, arguments=""))
        return ChatDelta(tool_calls=[ToolCallDelta(index=index, id=call_id(), type="function",
                                                   function=FunctionDelta(name=name, arguments=""))])

    def _arguments(self, arguments: str, index: int) -> ChatDelta:
        if self.plan.legacy:
            return ChatDelta(function_call=FunctionDelta(arguments=arguments))
        return ChatDelta(tool_calls=[ToolCallDelta(index=index, function=FunctionDelta(arguments=arguments))])

    def _delta(self, piece: ReplyDelta) -> ChatDelta:
        if piece.call_name is not None:
            return self._header(piece.call_name, 0)
        if piece.arguments:
            return self._arguments(piece.arguments, 0)
        return ChatDelta(content=piece.content)
