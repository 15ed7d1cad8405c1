"""Streams cut at arbitrary places, for the property tests of the stream parsers."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Protocol


class StreamParser(Protocol):
    def feed(self, text: str) -> list[Any]: ...

    def finish(self) -> list[Any]: ...


def fed_in_pieces(parser: StreamParser, text: str, cuts: Iterable[int]) -> list[Any]:
    """Everything ``parser`` emits for ``text`` cut at ``cuts`` (each taken modulo the text's length + 1)."""
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = []
    for start, end in itertools.pairwise(bounds):
        pieces += parser.feed(text[start:end])
    return pieces + parser.finish()
