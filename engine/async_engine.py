"""``AsyncEngine``: one engine thread owns the model; asyncio callers get per-request streams of deltas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.engine import EngineStats, InvalidRequestError, LLMEngine, ModelInfo, StepOutput
from engine.pooling import PoolingTask
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


@dataclass
class _Pool:
    """A pooling request (``LLMEngine.add_pooling``): its prompts join the continuous batch."""

    request_id: str
    prompts: list[list[int]]
    task: PoolingTask
    deliver: Callable[[StepOutput | BaseException], bool]


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
        self._pooling_ids = itertools.count()
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
            async for output in self._outputs(request_id,
                                              lambda deliver: _Add(request_id, list(prompt_ids), params, deliver)):
                yield output
        finally:
            self._release()

    async def _outputs(self, request_id: str,
                       message: Callable[[Callable[[StepOutput | BaseException], bool]], _Add | _Pool]
                       ) -> AsyncIterator[StepOutput]:
        """The outputs of the request ``message`` queues (given how to deliver them); leaving early aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

        def deliver(item: StepOutput | BaseException) -> bool:
            """Hand ``item`` to the caller's event loop; False when that loop is gone."""
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:
                return False
            return True

        self._inbox.put(message(deliver))
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

    async def _pooled(self, task: PoolingTask, prompts: Seq[Seq[int]]) -> torch.Tensor:
        """The rows of a pooling request, admitted as a generation request is (``QueueFullError`` beyond the
        engine's seats and queue); leaving early aborts it."""
        if self.error is not None:
            raise EngineDeadError(str(self.error)) from self.error
        self._admit()
        request_id = f"pooling-{next(self._pooling_ids)}"
        listed = [list(prompt) for prompt in prompts]
        try:
            stream = self._outputs(request_id, lambda deliver: _Pool(request_id, listed, task, deliver))
            async with contextlib.aclosing(stream):
                async for output in stream:
                    if output.finished:
                        assert output.pooled is not None
                        return output.pooled
        finally:
            self._release()
        raise EngineDeadError("the pooling request ended without its rows")

    async def prompt_logprobs(self, prompt_ids: Seq[int], top: int) -> list[dict[int, float] | None]:
        """Each prompt token's log-probability given those before it (and the ``top`` alternatives), computed on
        the engine thread between steps; raises ``InvalidRequestError`` for a prompt it cannot run."""
        ids = list(prompt_ids)
        return await self.call(lambda llm: llm.prompt_logprobs(ids, top))  # type: ignore[return-value]

    async def embed(self, prompts: Seq[Seq[int]], pooling: str) -> torch.Tensor:
        """Pooled, L2-normalised final hidden states of ``prompts``, fp32 [prompts, hidden], computed in the
        continuous batch beside other requests; raises ``InvalidRequestError`` for prompts it cannot run."""
        return await self._pooled(PoolingTask.embed(pooling), prompts)

    async def last_token_logits(self, prompts: Seq[Seq[int]], token_ids: Seq[int]) -> torch.Tensor:
        """fp32 logits of ``token_ids`` at each prompt's last position [prompts, len(token_ids)], computed in the
        continuous batch."""
        return await self._pooled(PoolingTask.logits(tuple(token_ids)), prompts)

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
        """Apply queued adds and aborts, and run queued calls; False on shutdown."""
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if message is None:
                return False
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
                if isinstance(message, _Pool):
                    self._engine.add_pooling(message.request_id, message.prompts, message.task)
                else:
                    self._engine.add_request(message.request_id, message.prompt_ids, message.params)
            except (ValueError, QueueFullError) as exc:
                message.deliver(exc if isinstance(exc, QueueFullError) else InvalidRequestError(str(exc)))
                continue
            self._deliver[message.request_id] = message.deliver

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, (_Add, _Call, _Pool)):
                message.deliver(error)
