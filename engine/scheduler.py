"""Continuous batching: who runs in the next step, admission, preemption by recompute."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from engine.kv_cache import BlockManager
from engine.sequence import Sequence, Status
from engine.state_slots import StateSlots


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048  # tokens computed in one step: decodes, prompts and prompt chunks
    max_waiting: int = 256

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes in each step")


class Scheduler:
    """Running sequences decode every step; waiting ones join as soon as there is room (blocks, seats, a token of
    the step's budget); prompts longer than the budget are computed a chunk a step.

    When the cache runs out of blocks, the newest running sequence is preempted: its blocks are freed and it
    goes back to the head of the queue to be recomputed later (prompt and output so far). With ``states`` (hybrid
    models), a running sequence also holds a state slot, given back with its blocks; a cached prefix resumes from
    its state snapshot, and a prompt's last full block gets one when the step that computes it is scheduled.
    """

    def __init__(self, blocks: BlockManager, config: SchedulerConfig, cache_key: Callable[[Sequence], Hashable],
                 states: StateSlots | None = None):
        self.blocks = blocks
        self.states = states
        self.config = config
        self.cache_key = cache_key
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_room(self, incoming: int = 0) -> bool:
        """Whether one more request fits: ``max_waiting`` may wait beyond the free running seats
        (``incoming``: requests on their way in that are not counted yet)."""
        free_seats = max(0, self.config.max_num_seqs - len(self.running))
        return len(self.waiting) + incoming < self.config.max_waiting + free_seats

    def add(self, seq: Sequence) -> None:
        if not self.has_room():
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step, each computing from ``num_computed`` to its ``step_end``.

        Every running decode comes first (one token each, and any drafted after it), then waiting prompts that fit
        the token budget whole (admitted in order as seats and blocks allow), then prompts too long for what is left,
        oldest first, take the rest of the budget as a chunk. A long prompt is thus prefilled over several steps
        (chunked prefill): it never holds the queue behind it, and decodes and short prompts keep flowing while it is
        computed."""
        decodes: list[Sequence] = []
        prefilling: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue
            if len(seq) - seq.num_computed > 1:  # blocks for the whole prompt were taken at admission
                prefilling.append(seq)
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                self._take(seq, 1)
                decodes.append(seq)
        batch = decodes
        budget = self.config.max_num_batched_tokens - sum(seq.step_end - seq.num_computed for seq in decodes)
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq, self.cache_key(seq), share=seq.reads_cached_prefix):
                break
            self.waiting.popleft()
            if self.states is not None:
                self.states.take(seq)
                if seq.num_computed:  # resumable prefixes only (``BlockManager.resumable``)
                    self.states.restore(seq, seq.block_hashes[seq.num_computed // self.blocks.block_size - 1])
            if seq.num_cached_prompt_tokens == 0 and not seq.output_ids:
                seq.num_cached_prompt_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            if len(seq) - seq.num_computed > budget:
                prefilling.append(seq)  # chunked below, after the prompts that fit whole
                continue
            budget -= self._take(seq, budget)
            batch.append(seq)
        for seq in prefilling:
            if budget <= 0:
                break
            if seq.status is Status.RUNNING:
                budget -= self._take(seq, budget)
                batch.append(seq)
        return batch

    def _take(self, seq: Sequence, budget: int) -> int:
        """Schedule at most ``budget`` of ``seq``'s uncomputed tokens and offer the blocks they complete for
        sharing (a sequence scheduled later in the same step reads them after they are written); how many."""
        remaining = len(seq) - seq.num_computed
        seq.chunk_end = None if remaining <= budget else seq.num_computed + budget
        self.blocks.register(seq, self.cache_key(seq))
        if self.states is not None:
            self._plan_snapshot(seq)
        return min(remaining, budget)

    def _plan_snapshot(self, seq: Sequence) -> None:
        """A hybrid model's state at the end of the prompt's last full block, kept when this step computes it (a
        later request that shares the prompt resumes there)."""
        assert self.states is not None
        size = self.blocks.block_size
        boundary = len(seq.prompt_ids) // size * size
        seq.snapshot = None
        if seq.num_computed < boundary <= seq.step_end and len(seq.block_hashes) >= boundary // size:
            slot = self.states.snapshot(seq.block_hashes[boundary // size - 1])
            if slot is not None:
                seq.snapshot = (boundary, slot)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` done and give its blocks back at once."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks and state slot (and forget its drafted tokens: their blocks go too)."""
        self.blocks.free(seq)
        seq.draft_ids = []
        if self.states is not None:
            self.states.give_back(seq)
