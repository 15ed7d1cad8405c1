"""A chat reply read back into OpenAI's shape: a thinking model's reasoning apart from its answer, and the answer's
calls (``server.tools``); whole (a message) or streamed (deltas), the same reading either way."""

from __future__ import annotations

from server.chat_plan import ChatPlan
from server.protocol import ChatDelta, ChatMessageOut
from server.tools import StreamedReply
from tokenizer.reasoning import ReasoningPiece, ReasoningSplitter, split_reasoning


def whole_reply(plan: ChatPlan, text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
    """A whole reply as an OpenAI message and its finish reason."""
    reasoning, answer = split_reasoning(text, plan.in_thought) if plan.thinks else (None, text)
    if plan.tools is None:
        return ChatMessageOut.of(answer, reasoning), finish_reason
    return plan.tools.message(answer, finish_reason, reasoning)


class StreamedChatReply:
    """One choice's reply as it streams: text in, deltas out."""

    def __init__(self, plan: ChatPlan) -> None:
        self._splitter = ReasoningSplitter(plan.in_thought) if plan.thinks else None
        self._calls = StreamedReply(plan.tools) if plan.tools is not None else None

    @property
    def in_thought(self) -> bool:
        """Whether the reply read so far ends inside its thought."""
        return self._splitter is not None and self._splitter.in_thought

    def feed(self, text: str) -> list[ChatDelta]:
        if self._splitter is None:
            return self._answer(text)
        return self._pieces(self._splitter.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        deltas = self._pieces(self._splitter.finish()) if self._splitter is not None else []
        if self._calls is None:
            return deltas, finish_reason
        closing, finish_reason = self._calls.finish(finish_reason)
        return deltas + closing, finish_reason

    def _pieces(self, pieces: list[ReasoningPiece]) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        for piece in pieces:
            if piece.reasoning:
                out.append(ChatDelta(reasoning_content=piece.reasoning, reasoning=piece.reasoning))
            out += self._answer(piece.content)
        return out

    def _answer(self, text: str) -> list[ChatDelta]:
        if self._calls is not None:
            return self._calls.feed(text)
        return [ChatDelta(content=text)] if text else []
