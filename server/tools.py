"""OpenAI tools and legacy functions for one request: which functions the prompt offers, whether a call is
required, and the model's replies read back into OpenAI messages and stream deltas. How calls look in the text is
the served model's ``ToolFormat``; the ``legacy`` ``functions`` shape only changes how calls are written out."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from server.tool_formats import ToolFormat
from server.tool_formats.base import CallStreamParser
from tokenizer import ChatMessage
from tokenizer.call_pieces import CallPiece, FunctionCall
from tokenizer.react import Tool


@dataclass
class ToolPlan:
    """How one request uses functions: those in the prompt, whether it must call one (and which), the format
    calls take in the text, and the answer's shape."""

    tools: list[Tool]
    required: bool
    forced: str | None
    legacy: bool
    format: ToolFormat
    single_call: bool = False

    @property
    def prefix(self) -> str:
        """Reply text put in the prompt: the opening of a required call."""
        return self.format.call_prefix(self.forced) if self.required else ""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.format.stop_strings

    @property
    def template_kwargs(self) -> dict[str, object]:
        return self.format.template_kwargs(self.tools)

    @staticmethod
    def of(request: ChatCompletionRequest, tool_format: ToolFormat) -> ToolPlan | None:
        """None when neither the request nor its conversation involves functions."""
        in_history = any(m.role in ("tool", "function") or m.tool_calls or m.function_call for m in request.messages)
        if not request.function_specs and not in_history:
            return None
        tools = []
        if request.calls_allowed:
            tools = [Tool(spec.model_name, spec.description, spec.described_parameters, spec.name_for_human,
                          spec.description_for_model) for spec in request.function_specs]
        return ToolPlan(tools, request.call_required, request.forced_function, request.legacy_functions,
                        tool_format, single_call=request.legacy_functions or not request.parallel_tool_calls)

    def messages(self, messages: Sequence[ChatMessageIn]) -> tuple[list[ChatMessage], bool]:
        """The conversation as the prompt's turns, and whether the last assistant turn is left open."""
        return self.format.turns(messages, self.tools, self.prefix)

    def parser(self) -> CallStreamParser:
        return self.format.stream_parser(self.tools, self.prefix)

    def message(self, text: str, finish_reason: str | None,
                reasoning: str | None = None) -> tuple[ChatMessageOut, str | None]:
        """A whole reply (its answer part) as an OpenAI message and its finish reason."""
        content, calls = self.format.parse(self.tools, self.prefix, text)
        if not calls:
            return ChatMessageOut.of(content, reasoning), finish_reason
        outs = [FunctionCallOut(name=c.name, arguments=c.arguments) for c in self._kept(calls)]
        if self.legacy:
            out = ChatMessageOut.of(content or None, reasoning, function_call=outs[0])
        else:
            out = ChatMessageOut.of(content or None, reasoning,
                                    tool_calls=[ToolCallOut(id=call_id(), function=call) for call in outs])
        return out, self.finish_reason_for(finish_reason)

    def _kept(self, calls: tuple[FunctionCall, ...]) -> tuple[FunctionCall, ...]:
        return calls[:1] if self.single_call else calls

    def finish_reason_for(self, finish_reason: str | None) -> str | None:
        """The reason a reply that made a call ended: the call, unless it was cut by the length limit."""
        if finish_reason == "length":
            return finish_reason
        return "function_call" if self.legacy else "tool_calls"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class StreamedReply:
    """One choice's streamed reply (its answer part): text in, OpenAI deltas out."""

    plan: ToolPlan
    parser: CallStreamParser = field(init=False)
    called: bool = False

    def __post_init__(self) -> None:
        self.parser = self.plan.parser()

    def feed(self, text: str) -> list[ChatDelta]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        deltas = self._deltas(self.parser.finish())
        return deltas, self.plan.finish_reason_for(finish_reason) if self.called else finish_reason

    def _deltas(self, pieces: list[CallPiece]) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        for piece in pieces:
            if piece.content:
                out.append(ChatDelta(content=piece.content))
            if self.plan.single_call and piece.index > 0:  # legacy, or parallel_tool_calls false
                continue
            if piece.name is not None:
                out.append(self._header(piece.name, piece.index))
            if piece.arguments:
                out.append(self._arguments(piece.arguments, piece.index))
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
