"""Stored Responses API responses, bounded: a byte budget and an age limit, oldest evicted first. A stored response
keeps its conversation (chat messages, without instructions) so that ``previous_response_id`` continues it; a
running response can be cancelled. With API keys, each entry belongs to the key that made it; another key finds
nothing there. Used from the preparation threads and the event loop, so every access holds the lock."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("qwen_serve")


@dataclass(frozen=True)
class StoredResponse:
    owner: str | None
    response: dict[str, Any]
    messages: list[dict[str, Any]]
    size: int
    stored_at: float


@dataclass
class RunningResponse:
    owner: str | None
    snapshot: Callable[[], dict[str, Any]]  # the response as it stands
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class ResponseStore:
    def __init__(self, max_bytes: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.max_age, self._clock = max_bytes, max_age, clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._running: dict[str, RunningResponse] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Bytes held (the JSON size of every stored response and its conversation)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, owner: str | None, response: dict[str, Any],
            messages: list[dict[str, Any]]) -> bool:
        """Keep a finished response (serializes it to weigh it: call it off the loop); False when it alone is larger
        than the budget."""
        size = len(json.dumps(response)) + len(json.dumps(messages))
        if size > self.max_bytes:
            log.warning("response %s (%d bytes) is larger than the store's budget; not stored", response_id, size)
            return False
        with self._lock:
            self._expire()
            while self._entries and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[response_id] = StoredResponse(owner, response, messages, size, self._clock())
            self._bytes += size
        return True

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(response_id)
        return entry if entry is not None and entry.owner == owner else None

    def delete(self, response_id: str, owner: str | None) -> bool:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return False
            self._drop(response_id)
            return True

    def _expire(self) -> None:
        oldest = self._clock() - self.max_age
        while self._entries and next(iter(self._entries.values())).stored_at < oldest:
            self._drop(next(iter(self._entries)))

    def _drop(self, response_id: str) -> None:
        self._bytes -= self._entries.pop(response_id).size

    # -- running responses (the event loop's) ------------------------------------------------------------------

    def started(self, response_id: str, owner: str | None,
                snapshot: Callable[[], dict[str, Any]]) -> RunningResponse:
        running = RunningResponse(owner, snapshot)
        self._running[response_id] = running
        return running

    def ended(self, response_id: str) -> None:
        self._running.pop(response_id, None)

    def running(self, response_id: str, owner: str | None) -> RunningResponse | None:
        entry = self._running.get(response_id)
        return entry if entry is not None and entry.owner == owner else None
