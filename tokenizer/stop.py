"""Stop-string matching over a stream of text deltas."""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Emits text up to (never including) the first stop string, across any delta boundaries.

    "First" is the occurrence that is complete earliest (ties: the one that starts earliest), so the result
    does not depend on how the text is split into deltas. Only the tail that could still be the start of a
    stop string is held back.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stops = tuple(sorted({s for s in stop_strings if s}, key=len))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Text that is now safe to emit. After a match, ``stopped`` is True and later pushes emit nothing."""
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        buffer = self._held + delta
        best: tuple[int, int] | None = None
        for stop in self._stops:
            index = buffer.find(stop)
            if index != -1 and (best is None or (index + len(stop), index) < best):
                best, self.matched = (index + len(stop), index), stop
        if best is not None:
            self.stopped, self._held = True, ""
            return buffer[: best[1]]
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation without a match: release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
