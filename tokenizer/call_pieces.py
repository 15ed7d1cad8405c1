"""What every tool-call stream parser emits, and the small text helpers they share.

A parser turns reply text into ``CallPiece`` s: content text, the start of a call (its name), or a piece of a
call's arguments. Joined in order they give the whole reply's content and calls (``assemble``), so a reply read
whole and the same reply streamed cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str


@dataclass(frozen=True)
class CallPiece:
    """Content text; or, for call ``index`` (counted from 0), its start (``name``) and/or argument text."""

    content: str = ""
    name: str | None = None
    arguments: str = ""
    index: int = 0

    @property
    def is_call(self) -> bool:
        return self.name is not None or bool(self.arguments)


def assemble(pieces: Iterable[CallPiece]) -> tuple[str, tuple[FunctionCall, ...]]:
    """The content and the calls that ``pieces`` spell out."""
    content: list[str] = []
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for piece in pieces:
        content.append(piece.content)
        if piece.name is not None:
            names[piece.index] = piece.name
        if piece.arguments:
            arguments.setdefault(piece.index, []).append(piece.arguments)
    calls = tuple(FunctionCall(name, "".join(arguments.get(index, []))) for index, name in sorted(names.items()))
    return "".join(content), calls


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def hold_partial(text: str, marker: str) -> tuple[str, str]:
    """``text`` as what can go out now and the end held back because it may be the start of ``marker``."""
    keep = partial_suffix(text, marker)
    return text[: len(text) - keep], text[len(text) - keep :]


class TrimmedText:
    """Streamed text with white space trimmed at both ends: leading white space is dropped, trailing white space
    is held until more text shows it is inside (and dropped if the text ends there)."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        kept = text.rstrip()
        if not kept:
            self._held += text
            return ""
        out = self._held + kept
        self._held = text[len(kept) :]
        return out
