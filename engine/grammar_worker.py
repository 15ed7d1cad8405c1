"""Grammar compilation in worker processes, for grammars made from untrusted input.

xgrammar is native code: some JSON schemas crash it (a long ``$ref`` chain overflows its stack) or keep it busy
for minutes. Schemas are bounded before they get here, but no bound proves that, so the server compiles in
worker processes: a crash or a time limit costs that worker (it is started again) and fails only the request
that caused it. Each worker keeps xgrammar's cache, capped in bytes. Compiled grammars come back serialized.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from engine.grammar import Grammar, GrammarError, GrammarSpec, compile_spec, xgrammar

if TYPE_CHECKING:
    import xgrammar as xgr

STARTUP_SECONDS = 120.0  # a fresh worker imports xgrammar and reads the vocabulary before its first grammar


def _serve(conn: Connection, tokenizer_info_json: str, cache_limit_bytes: int) -> None:
    """A worker's life: compile each spec it is sent, answer ("ok", serialized) or ("error", message)."""
    info = xgrammar().TokenizerInfo.deserialize_json(tokenizer_info_json)
    compiler = xgrammar().GrammarCompiler(info, max_threads=1, cache_limit_bytes=cache_limit_bytes)
    conn.send(("ready", ""))
    while (spec := conn.recv()) is not None:
        try:
            conn.send(("ok", compile_spec(compiler, spec).serialize_json()))
        except (GrammarError, RecursionError, ValueError) as exc:
            conn.send(("error", str(exc)))


class _Worker:
    """One worker process and its pipe; started on first use and again after a crash or a time-out."""

    def __init__(self, tokenizer_info_json: str, cache_limit_bytes: int) -> None:
        self._args = (tokenizer_info_json, cache_limit_bytes)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs torch threads
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs, *self._args), daemon=True,
                                        name="qwen-serve-grammar")
        self._process.start()
        theirs.close()
        self._conn, self._ready = ours, False

    def compile(self, spec: GrammarSpec, timeout: float) -> str:
        """The compiled grammar, serialized; ``GrammarError`` when it fails, crashes or runs out of time."""
        if self._process is None or not self._process.is_alive():
            self.start()
        if not self._ready:
            self._receive(STARTUP_SECONDS, "start")
            self._ready = True
        assert self._conn is not None
        try:
            self._conn.send(spec)
        except (BrokenPipeError, OSError) as exc:
            self.stop()
            raise GrammarError("the grammar compiler was not running; try again") from exc
        return self._receive(timeout, "compile")

    def _receive(self, timeout: float, what: str) -> str:
        assert self._conn is not None
        try:
            if not self._conn.poll(timeout):
                self.stop()
                raise GrammarError(f"the grammar did not {what} within {timeout:g} s; simplify the schema")
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            self.stop()
            raise GrammarError("the grammar compiler crashed on this schema; simplify it") from exc
        if kind == "error":
            raise GrammarError(payload)
        return payload

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None


class IsolatedGrammarCompiler:
    """Compiles ``GrammarSpec``s in ``workers`` processes (each started on its first grammar), each grammar within
    ``timeout`` seconds. ``compile`` blocks its (worker) thread until a process is free. ``make_info`` builds
    xgrammar's view of the vocabulary, on the first grammar (so a server starts without importing xgrammar)."""

    def __init__(self, make_info: Callable[[], xgr.TokenizerInfo], *, workers: int, timeout: float,
                 cache_limit_bytes: int) -> None:
        self._make_info = make_info
        self._info: xgr.TokenizerInfo | None = None
        self._timeout, self._count, self._cache_limit_bytes = timeout, workers, cache_limit_bytes
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._started = threading.Lock()

    def _start(self) -> xgr.TokenizerInfo:
        """The vocabulary's info, and the idle workers that compile against it (made once)."""
        with self._started:
            if self._info is None:
                info = self._make_info()
                info_json = info.serialize_json()
                self._workers = [_Worker(info_json, self._cache_limit_bytes) for _ in range(self._count)]
                for worker in self._workers:
                    self._idle.put(worker)
                self._info = info
            return self._info

    def compile(self, spec: GrammarSpec) -> Grammar:
        info = self._start()
        worker = self._idle.get()
        try:
            serialized = worker.compile(spec, self._timeout)
        finally:
            self._idle.put(worker)
        return Grammar(xgrammar().CompiledGrammar.deserialize_json(serialized, info))

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
