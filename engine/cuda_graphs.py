"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured on first use.

A decode step of a paged-decode model has shapes fixed by its row count alone (``PagedLayout``: block tables
padded to the longest context), so the whole forward pass, from the step's integers to the fp32 logits, is captured
once per bucket and replayed: one host-to-device copy and one launch per step instead of ~40 launches per layer.
Rows beyond the batch are padding: one token at position 0 written to the runner's scratch page.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from engine.runner import ModelRunner, StepShape
from engine.transfer import host_tensor

if TYPE_CHECKING:
    from engine.sequence import Sequence

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Captured decode steps of ``runner`` for up to ``max_rows`` sequences of up to ``max_model_len`` tokens."""

    def __init__(self, runner: ModelRunner, max_rows: int, max_model_len: int) -> None:
        self.runner = runner
        top = min(max_rows, BUCKETS[-1])
        self.buckets = [b for b in BUCKETS if b < top] + [top]
        self.width = math.ceil(max_model_len / runner.block_size) + 1  # pages a table can hold
        self.ints = torch.zeros(self._size(top), dtype=torch.long, device=runner.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: tuple[int, int] | None = None

    @property
    def captured(self) -> list[int]:
        """The buckets captured so far."""
        return sorted(self._graphs)

    def _size(self, rows: int) -> int:
        return rows * (5 + self.width)

    def fits(self, batch: list[Sequence]) -> bool:
        """A decode step (one new token each) of at most the largest bucket's rows."""
        return (len(batch) <= self.buckets[-1]
                and all(s.step_end - s.num_computed == 1 and len(s.block_table) <= self.width for s in batch))

    def run(self, batch: list[Sequence]) -> torch.Tensor:
        """fp32 logits [len(batch), vocab] of the step (a view of the graph's output, valid until the next step).
        Off CUDA the same fixed-shape step runs eagerly (how the tests check it without a GPU)."""
        rows = self.load(batch)
        if self.runner.device.type != "cuda":
            return self.forward(rows)[: len(batch)]
        graph, logits = self._graphs.get(rows) or self._capture(rows)
        graph.replay()
        return logits[: len(batch)]

    def load(self, batch: list[Sequence]) -> int:
        """Copy the step's integers into the static input, padded to the smallest bucket that holds the batch;
        returns that bucket."""
        rows = next(b for b in self.buckets if b >= len(batch))
        host = self.runner.host_ints(batch, self.width, rows)
        self.ints[: len(host)].copy_(host_tensor(host, torch.long, self.ints.device), non_blocking=True)
        return rows

    def forward(self, rows: int) -> torch.Tensor:
        """The step a graph captures: fp32 logits [rows, vocab] from the static input's first ``rows`` rows."""
        shape = StepShape(tokens=rows, rows=rows, width=self.width, max_q=1)
        token_ids, inputs = self.runner.step_inputs(self.ints[: self._size(rows)], shape)
        return self.runner.model(token_ids, inputs, self.runner.caches)

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture, sharing one memory
        pool across buckets. The step's integers at capture are padding rows only, so capture writes nothing but
        the scratch page; ``run`` has already copied the real ones when it captures."""
        saved = self.ints.clone()
        padding = self.runner.host_ints([], self.width, rows)
        self.ints[: len(padding)].copy_(torch.tensor(padding, dtype=torch.long))
        side = torch.cuda.Stream(self.ints.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(rows)
        self._pool = graph.pool()
        self.ints.copy_(saved)
        self._graphs[rows] = (graph, logits)
        return graph, logits
