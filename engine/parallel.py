"""Tensor parallelism (Megatron-style) over torch.distributed: which slice of each weight a rank holds, the
per-rank shapes, and the collectives the model runs.

Column-parallel: q/k/v (whole heads) and gate/up (a slice of the inner width); row-parallel, with one all-reduce
each: the attention output and down projections. The embedding and the LM head are split over the vocabulary: a
rank looks up only its ids (the others contribute zeros to an all-reduce) and computes only its logits (gathered,
for the rows being sampled). KV heads are split like query heads, or replicated when there are fewer KV heads than
ranks. Every rank ends a layer with the same hidden state, so the norms and the rotary math are not split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig

COLUMN_PARTS = {"q": "q", "k": "kv", "v": "kv", "q_bias": "q", "k_bias": "kv", "v_bias": "kv", "gate": "inner",
                "up": "inner", "embed": "vocab", "lm_head": "vocab"}  # sliced along their rows (output features)
ROW_PARTS = {"o": "q", "down": "inner"}  # sliced along their columns (input features)


@dataclass(frozen=True)
class Shard:
    """This process's place: rank ``rank`` of ``world`` ranks."""

    rank: int
    world: int

    def check(self, config: ModelConfig) -> None:
        """Refuse (ValueError, naming the constraint) a model that does not split evenly over the ranks."""
        n, heads, kv = self.world, config.num_heads, config.num_kv_heads
        problems = []
        if heads % n:
            problems.append(f"{heads} attention heads do not divide by {n}")
        if kv % n and n % kv:
            problems.append(f"{kv} KV heads neither divide by {n} nor divide {n} (to be replicated)")
        if config.intermediate_size % n:
            problems.append(f"the MLP width {config.intermediate_size} does not divide by {n}")
        if config.num_experts:
            problems.append("expert (MoE) models are not split yet")
        if config.hybrid:
            problems.append("hybrid (linear-attention) models are not split yet")
        if problems:
            raise ValueError(f"--tensor-parallel-size {n} cannot split this model: {'; '.join(problems)}")

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes one rank holds: its heads, KV heads and MLP width (the vocabulary split is ``vocab_rows``)."""
        return dataclasses.replace(config, num_heads=config.num_heads // self.world,
                                   num_kv_heads=max(1, config.num_kv_heads // self.world),
                                   intermediate_size=config.intermediate_size // self.world)

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """This rank's rows of the embedding and the head: ``ceil(vocab / world)`` each, the last rank's fewer."""
        per_rank = -(-vocab_size // self.world)
        start = min(self.rank * per_rank, vocab_size)
        return start, min(start + per_rank, vocab_size)

    def span(self, kind: str, config: ModelConfig) -> tuple[int, int]:
        """Rows (or columns) of a weight of ``kind`` ("q", "kv", "inner", "vocab") that this rank holds."""
        d, r, n = config.head_dim, self.rank, self.world
        if kind == "q":
            per_rank = config.num_heads // n * d
            return r * per_rank, (r + 1) * per_rank
        if kind == "kv":
            kv = config.num_kv_heads
            head = r * kv // n if kv < n else None  # replicated: the one KV head this rank's query heads use
            if head is not None:
                return head * d, (head + 1) * d
            per_rank = kv // n * d
            return r * per_rank, (r + 1) * per_rank
        if kind == "inner":
            per_rank = config.intermediate_size // n
            return r * per_rank, (r + 1) * per_rank
        return self.vocab_rows(config.vocab_size)

    def spans(self, part: str, config: ModelConfig) -> list[Span] | None:
        """The pieces of the full tensor of ``part`` this rank holds, to be joined along dim 0 (None: all of it)."""
        if part in ("qkv", "qkv_bias"):  # Qwen-1's fused c_attn: q, k and v one after another
            offsets = (0, config.q_size, config.q_size + config.kv_size)
            kinds = ("q", "kv", "kv")
            return [Span(0, offset + start, offset + stop) for offset, kind in zip(offsets, kinds, strict=True)
                    for start, stop in [self.span(kind, config)]]
        if part in COLUMN_PARTS:
            return [Span(0, *self.span(COLUMN_PARTS[part], config))]
        if part in ROW_PARTS:
            return [Span(1, *self.span(ROW_PARTS[part], config))]
        return None

    def slice(self, part: str, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """This rank's slice of the full tensor of ``part`` (unchanged for replicated parts)."""
        spans = self.spans(part, config)
        if spans is None:
            return weight
        return torch.cat([weight.narrow(span.dim, span.start, span.stop - span.start) for span in spans])


@dataclass(frozen=True)
class Span:
    """Indices ``start``..``stop`` along dimension ``dim``."""

    dim: int
    start: int
    stop: int


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial product, summed over the ranks."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallel:
    """The embedding lookup and the LM head over a vocabulary split by rows: ``start``..``stop`` here, each rank's
    slice padded to ``per_rank`` rows for the gather."""

    def __init__(self, shard: Shard, vocab_size: int, group: dist.ProcessGroup | None) -> None:
        self.start, self.stop = shard.vocab_rows(vocab_size)
        self.per_rank = -(-vocab_size // shard.world)
        self.vocab_size, self.world, self.group = vocab_size, shard.world, group

    def embed(self, token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        rows = F.embedding(local.masked_fill(outside, 0), table).masked_fill(outside[:, None], 0)
        dist.all_reduce(rows, group=self.group)
        return rows

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, this rank's vocab] -> [rows, vocab], every rank's columns in order."""
        padded = F.pad(logits, (0, self.per_rank - logits.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts, dim=1)[:, : self.vocab_size]
