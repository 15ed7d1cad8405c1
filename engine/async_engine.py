"""``AsyncEngine``: one engine thread owns the model; asyncio callers get per-request streams of deltas."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.engine import EngineStats, InvalidRequestError, LLMEngine, ModelInfo, StepOutput
from engine.sampling import SamplingParams
from engine.scheduler import QueueFullError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qwen_serve.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can run any more."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine (its sampling or grammar); the others run on."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[StepOutput | BaseException], bool]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], object]
    deliver: Callable[[object], bool]


PoolingKind = tuple[str, str] | tuple[str, tuple[int, ...]]  # ("embed", pooling) or ("logits", token ids)


@dataclass
class _Pool:
    """Prompts to pool in one pass (an embedding or rerank request's share of one): passes of one kind queued at
    once share a pass."""

    kind: PoolingKind
    prompts: list[list[int]]
    deliver: Callable[[object], bool]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.prompts))


class AsyncEngine:
    """Wraps ``LLMEngine`` in a background thread; the only way other threads reach the engine.

    ``generate`` is an async iterator of ``StepOutput`` deltas. Leaving it early (a client that went away,
    a cancelled task) aborts the request, which frees its blocks before the next step. Callers read only
    ``info`` (fixed at load) and ``stats`` (a snapshot the engine thread publishes after every step). A failure
    of one request's sampling ends that request with ``RequestFailedError``; any other exception in the engine
    thread is logged, delivered to every waiting request as ``EngineDeadError``, marks the engine dead and calls
    the ``on_failure`` callbacks.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.info: ModelInfo = engine.info
        self.stats: EngineStats = engine.stats()
        self.on_failure: list[Callable[[BaseException], None]] = []
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | _Pool | None] = queue.SimpleQueue()
        self._deliver: dict[str, Callable[[StepOutput | BaseException], bool]] = {}
        self._admitted = 0
        self._capacity = self.info.max_num_seqs + self.info.max_waiting
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwen-serve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def _admit(self) -> None:
        """Count one request in, or raise ``QueueFullError`` when running seats and the queue are all taken."""
        with self._lock:
            if self._admitted >= self._capacity:
                raise QueueFullError("the request queue is full")
            self._admitted += 1

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def generate(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams
                       ) -> AsyncIterator[StepOutput]:
        if self.error is not None:
            raise EngineDeadError(str(self.error)) from self.error
        self._admit()
        try:
            async for output in self._outputs(request_id, prompt_ids, params):
                yield output
        finally:
            self._release()

    async def _outputs(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams
                       ) -> AsyncIterator[StepOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

        def deliver(item: StepOutput | BaseException) -> bool:
            """Hand ``item`` to the caller's event loop; False when that loop is gone."""
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:
                return False
            return True

        self._inbox.put(_Add(request_id, list(prompt_ids), params, deliver))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run ``fn(engine)`` on the engine thread between steps (e.g. prompt logits) and return its result."""
        future, deliver = self._awaited()
        self._inbox.put(_Call(fn, deliver))
        return await future

    def _awaited(self) -> tuple[asyncio.Future[object], Callable[[object], bool]]:
        """A future on the caller's loop, and how the engine thread settles it (a result, or an exception to
        raise); False when that loop is gone."""
        if self.error is not None:
            raise EngineDeadError(str(self.error)) from self.error
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()

        def deliver(result: object) -> bool:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                return False
            return True

        return future, deliver

    async def _pooled(self, kind: PoolingKind, prompts: Seq[Seq[int]]) -> torch.Tensor:
        future, deliver = self._awaited()
        self._inbox.put(_Pool(kind, [list(p) for p in prompts], deliver))
        return await future  # type: ignore[return-value]

    async def prompt_logprobs(self, prompt_ids: Seq[int], top: int) -> list[dict[int, float] | None]:
        """Each prompt token's log-probability given those before it (and the ``top`` alternatives), computed on
        the engine thread between steps; raises ``InvalidRequestError`` for a prompt it cannot run."""
        ids = list(prompt_ids)
        return await self.call(lambda llm: llm.prompt_logprobs(ids, top))  # type: ignore[return-value]

    async def embed(self, prompts: Seq[Seq[int]], pooling: str) -> torch.Tensor:
        """Pooled, L2-normalised final hidden states of ``prompts`` (``LLMEngine.embed``), from a pass on the engine
        thread between steps that other requests' prompts may share; raises ``InvalidRequestError`` for prompts it
        cannot run."""
        return await self._pooled(("embed", pooling), prompts)

    async def last_token_logits(self, prompts: Seq[Seq[int]], token_ids: Seq[int]) -> torch.Tensor:
        """Logits of ``token_ids`` at each prompt's last position (``LLMEngine.last_token_logits``), from a pass
        between steps that other requests' prompts may share."""
        return await self._pooled(("logits", tuple(token_ids)), prompts)

    def shutdown(self) -> None:
        """Stop the engine thread after the step in progress."""
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self._engine.close()

    # -- engine thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self._engine
        try:
            while True:
                block = not engine.has_unfinished()
                if not self._drain_inbox(block):
                    return
                for output in engine.step():
                    self._hand_out(output)
                self.stats = engine.stats()
        except BaseException as exc:
            log.critical("the engine failed; every request now fails and the engine stays down", exc_info=exc)
            self.error = exc
            dead = EngineDeadError(f"engine failed: {exc!r}")
            for deliver in self._deliver.values():
                deliver(dead)
            self._deliver.clear()
            self._fail_inbox(dead)
            for callback in self.on_failure:
                callback(exc)

    def _hand_out(self, output: StepOutput) -> None:
        deliver = self._deliver.get(output.request_id)
        if output.finished:
            self._deliver.pop(output.request_id, None)
        if deliver is None:
            return
        item: StepOutput | BaseException = output if output.error is None else RequestFailedError(output.error)
        if not deliver(item) and not output.finished:
            self._deliver.pop(output.request_id, None)
            self._engine.abort(output.request_id)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts, run queued calls, then the queued pooling passes packed; False on
        shutdown."""
        pools: list[_Pool] = []
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                self._run_pools(pools)
                return True
            block = False
            if message is None:
                for pool in pools:
                    pool.deliver(EngineDeadError("the engine shut down"))
                return False
            if isinstance(message, _Pool):
                pools.append(message)
                continue
            if isinstance(message, _Abort):
                self._deliver.pop(message.request_id, None)
                self._engine.abort(message.request_id)
                continue
            if isinstance(message, _Call):
                try:
                    result: object = message.fn(self._engine)
                except Exception as exc:
                    result = exc
                message.deliver(result)
                continue
            try:
                self._engine.add_request(message.request_id, message.prompt_ids, message.params)
            except (ValueError, QueueFullError) as exc:
                message.deliver(exc if isinstance(exc, QueueFullError) else InvalidRequestError(str(exc)))
                continue
            self._deliver[message.request_id] = message.deliver

    def _run_pools(self, pools: list[_Pool]) -> None:
        """``pools`` packed by kind into passes of at most one step's token budget (each request's prompts kept
        together), each pass's rows handed back request by request. A pass that fails runs its requests one by one,
        so that only the failing one gets the error."""
        budget = self._engine.config.scheduler.max_num_batched_tokens
        by_kind: dict[PoolingKind, list[_Pool]] = {}
        for pool in pools:
            by_kind.setdefault(pool.kind, []).append(pool)
        for kind, queued in by_kind.items():
            shared: list[_Pool] = []
            tokens = 0
            for pool in queued:
                if shared and tokens + pool.tokens > budget:
                    self._run_pass(kind, shared)
                    shared, tokens = [], 0
                shared.append(pool)
                tokens += pool.tokens
            self._run_pass(kind, shared)

    def _run_pass(self, kind: PoolingKind, shared: list[_Pool]) -> None:
        try:
            rows = self._pool_rows(kind, [prompt for pool in shared for prompt in pool.prompts])
        except Exception as exc:
            if len(shared) > 1:
                for pool in shared:
                    self._run_pass(kind, [pool])
                return
            shared[0].deliver(exc)
            return
        start = 0
        for pool in shared:
            pool.deliver(rows[start : start + len(pool.prompts)])
            start += len(pool.prompts)

    def _pool_rows(self, kind: PoolingKind, prompts: list[list[int]]) -> torch.Tensor:
        task, argument = kind
        if task == "embed":
            return self._engine.embed(prompts, argument)  # type: ignore[arg-type]
        return self._engine.last_token_logits(prompts, argument)  # type: ignore[arg-type]

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, (_Add, _Call, _Pool)):
                message.deliver(error)
