"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured on first use.

A decode step of a paged-decode model has shapes fixed by its row count alone (``PagedLayout``: block tables
padded to the longest context), so the whole forward pass, from the step's integers to the fp32 logits, is captured
once per bucket and replayed: one host-to-device copy and one launch per step instead of ~40 launches per layer.
Rows beyond the batch are padding: one token at position 0 written to the runner's scratch page.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from engine.runner import ModelRunner, StepShape
from engine.transfer import host_tensor

if TYPE_CHECKING:
    from engine.sequence import Sequence

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphCapture(Protocol):
    """Records ``forward`` once and returns a replay of it with the output tensor the replays write."""

    def __call__(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]: ...


class CudaGraphCapture:
    """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture a CUDA graph; every graph
    shares one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: tuple[int, int] | None = None

    def __call__(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = forward()
        self._pool = graph.pool()
        return graph.replay, output


class DecodeGraphs:
    """Captured decode steps of ``runner`` for up to ``max_rows`` sequences of up to ``max_model_len`` tokens, each
    bucket recorded by ``capture`` on first use (None: every step runs eagerly, the same fixed-shape step; how the
    tests check it off CUDA)."""

    def __init__(self, runner: ModelRunner, max_rows: int, max_model_len: int,
                 capture: GraphCapture | None = None) -> None:
        self.runner, self.capture = runner, capture
        top = min(max_rows, BUCKETS[-1])
        self.buckets = [b for b in BUCKETS if b < top] + [top]
        self.width = math.ceil(max_model_len / runner.block_size) + 1  # pages a table can hold
        self.ints = torch.zeros(self._size(top), dtype=torch.long, device=runner.device)
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}

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
        """fp32 logits [len(batch), vocab] of the step (a view of the graph's output, valid until the next step)."""
        rows = self.load(batch)
        if self.capture is None:
            return self.forward(rows)[: len(batch)]
        replay, logits = self._graphs.get(rows) or self._capture(rows)
        replay()
        return logits[: len(batch)]

    def load(self, batch: list[Sequence]) -> int:
        """Copy the step's integers into the static input, padded to the smallest bucket that holds the batch;
        returns that bucket."""
        rows = next(b for b in self.buckets if b >= len(batch))
        self._copy_in(self.runner.host_ints(batch, self.width, rows))
        return rows

    def _copy_in(self, host: np.ndarray) -> None:
        self.ints[: len(host)].copy_(host_tensor(host, torch.long, self.ints.device), non_blocking=True)

    def forward(self, rows: int) -> torch.Tensor:
        """The step a graph captures: fp32 logits [rows, vocab] from the static input's first ``rows`` rows."""
        shape = StepShape(tokens=rows, rows=rows, width=self.width, max_q=1)
        token_ids, inputs = self.runner.step_inputs(self.ints[: self._size(rows)], shape)
        return self.runner.model(token_ids, inputs, self.runner.caches)

    def _capture(self, rows: int) -> tuple[Callable[[], None], torch.Tensor]:
        """Record the bucket's step. The step's integers at capture are padding rows only, so capture writes
        nothing but the scratch page; ``run`` has already copied the real ones, kept aside meanwhile."""
        saved = self.ints.clone()
        self._copy_in(self.runner.host_ints([], self.width, rows))
        self._graphs[rows] = self.capture(lambda: self.forward(rows))
        self.ints.copy_(saved)
        return self._graphs[rows]
