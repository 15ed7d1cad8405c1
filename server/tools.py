"""OpenAI tools and legacy functions on Qwen's ReAct prompt, and the model's replies back into calls."""

from __future__ import annotations

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
from tokenizer import ChatMessage
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
    stop_strings: tuple[str, ...] = STOP_STRINGS

    @property
    def prefix(self) -> str:
        return forced_call_prefix(self.forced) if self.required else ""

    @staticmethod
    def of(request: ChatCompletionRequest) -> ToolPlan | None:
        """None when neither the request nor its conversation involves functions."""
        in_history = any(m.role in ("tool", "function") or m.tool_calls or m.function_call for m in request.messages)
        if not request.function_specs and not in_history:
            return None
        tools = []
        if request.calls_allowed:
            try:
                tools = [Tool.from_function(spec.model_dump()) for spec in request.function_specs]
            except ReactError as exc:
                raise APIError(400, str(exc), param="tools") from exc
        return ToolPlan(tools, request.call_required, request.forced_function, request.legacy_functions)

    def messages(self, messages: list[ChatMessageIn]) -> tuple[list[ChatMessage], bool]:
        """The conversation as ReAct turns, and whether the last assistant turn is left open."""
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
        reply = parse_reply(self.prefix + text)
        if reply.call is None:
            return ChatMessageOut(content=reply.content), finish_reason
        call = FunctionCallOut(name=reply.call.name, arguments=reply.call.arguments)
        if self.legacy:
            out = ChatMessageOut(content=reply.content or None, function_call=call)
        else:
            out = ChatMessageOut(content=reply.content or None, tool_calls=[ToolCallOut(id=call_id(), function=call)])
        return out, self.finish_reason_for(finish_reason)

    def finish_reason_for(self, finish_reason: str | None) -> str | None:
        """The reason a reply that made a call ended: the call, unless it was cut by the length limit."""
        if finish_reason == "length":
            return finish_reason
        return "function_call" if self.legacy else "tool_calls"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class StreamedReply:
    """One choice's streamed reply: text in, OpenAI deltas out."""

    plan: ToolPlan
    parser: ReplyStreamParser = field(init=False)
    called: bool = False

    def __post_init__(self) -> None:
        self.parser = ReplyStreamParser(self.plan.prefix)

    def feed(self, text: str) -> list[ChatDelta]:
        return [self._delta(d) for d in self.parser.feed(text)] if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        deltas = [self._delta(d) for d in self.parser.finish()]
        return deltas, self.plan.finish_reason_for(finish_reason) if self.called else finish_reason

    def _delta(self, piece: ReplyDelta) -> ChatDelta:
        if piece.call_name is not None:
            self.called = True
            if self.plan.legacy:
                return ChatDelta(function_call=FunctionDelta(name=piece.call_name, arguments=""))
            return ChatDelta(tool_calls=[ToolCallDelta(index=0, id=call_id(), type="function",
                                                       function=FunctionDelta(name=piece.call_name, arguments=""))])
        if piece.arguments:
            if self.plan.legacy:
                return ChatDelta(function_call=FunctionDelta(arguments=piece.arguments))
            return ChatDelta(tool_calls=[ToolCallDelta(index=0, function=FunctionDelta(arguments=piece.arguments))])
        return ChatDelta(content=piece.content)
