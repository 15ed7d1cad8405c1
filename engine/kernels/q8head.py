"""The LM head on Q8_0 weights (``q8_head`` in ``quant_matmul.cpp``): packing and calls."""

from __future__ import annotations

import torch

from engine.kernels import native

BLOCK, TILE = 32, 16


def fits(q: torch.Tensor) -> bool:
    return q.shape[0] % TILE == 0 and q.shape[1] % BLOCK == 0


class Q8Matmul(native.RowKernel):
    """``y = norm?(x) @ W^T`` for rows ``x`` [M, in] -> fp32 [M, out], with W = q * scale (int8 ``q`` [out, in],
    fp32 ``scale`` [out, in / 32]) repacked per tile of 16 outputs, per block of 32 inputs, in 16 steps of 2; on the
    build for ``isa``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, isa: str) -> None:
        n, k = q.shape
        tiles, blocks = n // TILE, k // BLOCK
        self.q = q.view(tiles, TILE, blocks, BLOCK // 2, 2).permute(0, 2, 3, 1, 4).contiguous()
        self.scale = scale.float().view(tiles, TILE, blocks).transpose(1, 2).contiguous()
        super().__init__(native.library(isa).q8_head, (self.q.data_ptr(), self.scale.data_ptr(), n, k), n,
                         torch.float32, torch.float32)
