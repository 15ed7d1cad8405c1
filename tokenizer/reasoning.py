"""A thinking model's reply split into its reasoning (``<think>...</think>``) and its answer, whole or streamed.

The reply is in a thought from its first token when the prompt opened one (templates that pre-open ``<think>``);
otherwise a reply that starts with ``<think>`` (after white space) opens one. The thought ends at ``</think>``; a
reply cut inside it is all reasoning. Reasoning is trimmed at both ends, the answer's leading white space after a
thought is dropped. Text after the thought is never read as reasoning again.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizer.call_pieces import TrimmedText, hold_partial

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ReasoningPiece:
    reasoning: str = ""
    content: str = ""


def prompt_opens_thought(prompt_text: str) -> bool:
    """Whether ``prompt_text`` ends inside a thought (its last ``<think>`` is not closed)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def split_reasoning(text: str, in_thought: bool = False) -> tuple[str, str]:
    """Reasoning and answer of a whole reply."""
    splitter = ReasoningSplitter(in_thought)
    pieces = [*splitter.feed(text), *splitter.finish()]
    return "".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)


class ReasoningSplitter:
    """Reads a reply as it streams; the pieces reassemble to ``split_reasoning`` of the whole text."""

    def __init__(self, in_thought: bool = False) -> None:
        self._state = "thought" if in_thought else "start"  # start | thought | answer
        self._buffer = ""
        self._reasoning = TrimmedText()
        self._after_thought = False  # the answer's leading white space is still being dropped

    def feed(self, text: str) -> list[ReasoningPiece]:
        self._buffer += text
        if self._state == "start":
            opening = self._buffer.lstrip()
            if opening.startswith(THINK_OPEN):
                self._state, self._buffer = "thought", opening[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(opening):
                return []
            else:
                self._state = "answer"
        if self._state == "thought":
            end = self._buffer.find(THINK_CLOSE)
            if end < 0:
                thought, self._buffer = hold_partial(self._buffer, THINK_CLOSE)
                return self._thought(thought)
            thought, self._buffer = self._buffer[:end], self._buffer[end + len(THINK_CLOSE) :]
            self._state, self._after_thought = "answer", True
            return self._thought(thought) + self._answer()
        return self._answer()

    @property
    def in_thought(self) -> bool:
        """Whether the text fed so far ends inside the thought."""
        return self._state == "thought"

    def finish(self) -> list[ReasoningPiece]:
        if self._state == "thought":
            rest, self._buffer = self._buffer, ""
            return self._thought(rest)
        self._state = "answer"
        return self._answer()

    def _thought(self, text: str) -> list[ReasoningPiece]:
        kept = self._reasoning.push(text)
        return [ReasoningPiece(reasoning=kept)] if kept else []

    def _answer(self) -> list[ReasoningPiece]:
        text, self._buffer = self._buffer, ""
        if self._after_thought:
            text = text.lstrip()
            self._after_thought = not text
        return [ReasoningPiece(content=text)] if text else []
