"""The engine's record of one request."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.sampling import PenaltyState, SamplingParams, TokenMatcher

if TYPE_CHECKING:
    from engine.pooling import PooledPrompt


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt, generated tokens, cache blocks and sampling state of one request (``generator``: the seeded
    request's own random stream, on the device that samples)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_tokens: int
    ntk_alpha: float = 1.0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_prompt_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    matcher: TokenMatcher | None = None
    penalties: PenaltyState | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    registered_blocks: int = 0  # leading blocks of ``block_table`` whose digests the block manager registered
    chunk_end: int | None = None  # where this step's computation stops (chunked prefill); None: at ``len(self)``
    state_slot: int | None = None  # hybrid models: where the linear layers keep this sequence's states,
    restore_slot: int | None = None  # the snapshot its cached prefix resumes from (copied in at its next step),
    snapshot: tuple[int, int] | None = None  # and (position, slot): keep the state at that position this step
    slot_group: int | None = None  # with speculative decoding: the first of the slots its states move between
    draft_ids: list[int] = field(default_factory=list)  # tokens drafted after its last, verified by its next step
    pool: PooledPrompt | None = None  # a pooling request's prompt: computed, pooled, finished; nothing sampled

    def __post_init__(self) -> None:
        if self.params.grammar is not None:
            self.matcher = self.params.grammar.matcher(self.stop_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def step_end(self) -> int:
        """The position this step computes up to: the end of a prefill chunk, else every token and any drafted
        ones."""
        return len(self) + len(self.draft_ids) if self.chunk_end is None else self.chunk_end

    def step_tokens(self) -> list[int]:
        """The tokens this step computes (``num_computed`` to ``step_end``; a sequence verifying drafted tokens
        reaches the runner as rows of its own: ``LLMEngine._step_rows``)."""
        if self.step_end - self.num_computed == 1:
            return [self.token_at(self.num_computed)]
        return self.token_ids[self.num_computed : self.step_end]

    @property
    def prefilling(self) -> bool:
        """Whether this step leaves tokens uncomputed (a chunk of a long prompt): nothing is sampled for it."""
        return self.step_end < len(self)

    @property
    def reads_cached_prefix(self) -> bool:
        """Whether cached blocks may stand in for computing its first tokens (not when every token is pooled)."""
        return self.pool is None or not self.pool.job.task.needs_every_token

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt_len else self.output_ids[position - prompt_len]
