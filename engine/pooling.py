"""Pooling requests (embeddings, a reranker's yes/no logits): each prompt runs as a prefill-only sequence in the
continuous batch, and its final hidden states become one row of the request's answer once its last token is
computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.model import DecoderModel
    from engine.sequence import Sequence

POOLINGS = ("last", "mean", "cls")


@dataclass(frozen=True)
class PoolingTask:
    """What a pooling request asks of each prompt: ``embed``, its final hidden states (after the final norm) pooled
    by ``pooling`` (its last token, the mean of its tokens, or its first) and L2-normalised; or ``logits``, those
    of ``token_ids`` at its last position."""

    kind: str
    pooling: str = "last"
    token_ids: tuple[int, ...] = ()

    @staticmethod
    def embed(pooling: str) -> PoolingTask:
        return PoolingTask("embed", pooling=pooling)

    @staticmethod
    def logits(token_ids: tuple[int, ...]) -> PoolingTask:
        return PoolingTask("logits", token_ids=token_ids)

    @property
    def needs_every_token(self) -> bool:
        """Whether every position's hidden state counts (mean and first-token pooling), so that no cached prefix
        may stand in for computing it."""
        return self.kind == "embed" and self.pooling != "last"


@dataclass(eq=False)
class PoolingJob:
    """One pooling request: its prompts, handed to the scheduler as seats free up, and their rows as they finish."""

    request_id: str
    task: PoolingTask
    prompts: list[list[int]]
    rows: list[torch.Tensor | None] = field(default_factory=list)
    admitted: int = 0  # prompts handed to the scheduler so far
    live: list[Sequence] = field(default_factory=list)  # those waiting or running

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.prompts)

    @property
    def done(self) -> bool:
        """Every prompt admitted and none still waiting or running: all rows are there."""
        return self.admitted == len(self.prompts) and not self.live

    @property
    def tokens(self) -> int:
        return sum(map(len, self.prompts))

    def result(self) -> torch.Tensor:
        """Every prompt's row, in order, fp32 on the host."""
        return torch.stack(self.rows).cpu()  # type: ignore[arg-type]


@dataclass(eq=False)
class PooledPrompt:
    """A pooling sequence's place in its job, and what mean or first-token pooling has gathered so far."""

    job: PoolingJob
    index: int
    gathered: torch.Tensor | None = None


def pool_chunk(model: DecoderModel, seq: Sequence, hidden: torch.Tensor) -> torch.Tensor | None:
    """Fold this step's chunk of an ``embed`` sequence's prompt (``hidden``: its rows of the last layer's output,
    before the final norm) into its pooling; its row once the chunk ends the prompt, else None. A chunk from
    position 0 starts over (a preempted sequence is computed again from the start)."""
    target = seq.pool
    assert target is not None
    task = target.job.task
    last = not seq.prefilling
    if task.pooling == "last":
        return F.normalize(final_rows(model, hidden[-1:])[0], dim=-1) if last else None
    if task.pooling == "cls":
        if seq.num_computed == 0:
            target.gathered = final_rows(model, hidden[:1])[0]
    else:
        chunk = final_rows(model, hidden).sum(0)
        target.gathered = chunk if seq.num_computed == 0 else target.gathered + chunk
    if not last:
        return None
    assert target.gathered is not None
    pooled = target.gathered if task.pooling == "cls" else target.gathered / len(seq.prompt_ids)
    return F.normalize(pooled, dim=-1)


def final_rows(model: DecoderModel, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 final hidden states: the final norm over the last layer's output, in the head's dtype."""
    return model.final_norm(hidden.to(model.head_dtype)).float()
