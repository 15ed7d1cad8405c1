"""The work that readies a request (schema checks, grammar compilation, chat-template rendering, tokenization),
run on a bounded pool of threads so that the event loop only routes and streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.errors import APIError

T = TypeVar("T")


class Preparer:
    """Runs ``fn`` on one of ``workers`` threads within ``timeout`` seconds (else 408). At most ``max_pending``
    preparations may be queued or running at once (else 429). A request whose client leaves, or that runs out of
    time, stops waiting at once; a preparation that has not started by then never runs, and one that has keeps its
    thread until it ends (so it still counts against ``max_pending``)."""

    def __init__(self, workers: int, timeout: float, max_pending: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen-serve-prep")
        self._timeout = timeout
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._pending >= self._max_pending:
                raise APIError(429, "too many requests are being prepared; retry shortly", code="queue_full",
                               headers={"Retry-After": "1"})
            self._pending += 1
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(self._counted, fn)
        except BaseException:
            self._done()
            raise
        future.add_done_callback(lambda f: self._done() if f.cancelled() else None)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), self._timeout)
        except TimeoutError:
            message = f"the request took longer than {self._timeout:g} s to prepare"
            raise APIError(408, message, code="timeout") from None

    def _counted(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
