"""The LM head on Q8_0 weights (``q8_head`` in ``quant_matmul.cpp``): packing and calls."""

from __future__ import annotations

import torch

from engine.kernels import native

BLOCK, TILE = 32, 16


def fits(q: torch.Tensor) -> bool:
    return q.shape[0] % TILE == 0 and q.shape[1] % BLOCK == 0


class Q8Matmul:
    """``y = norm?(x) @ W^T`` for rows ``x`` [M, in] -> fp32 [M, out], with W = q * scale (int8 ``q`` [out, in],
    fp32 ``scale`` [out, in / 32]) repacked per tile of 16 outputs, per block of 32 inputs, in 16 steps of 2;
    ``fuse_norm`` makes the kernel apply an RMSNorm to each row first."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        n, k = q.shape
        tiles, blocks = n // TILE, k // BLOCK
        self.q = q.view(tiles, TILE, blocks, BLOCK // 2, 2).permute(0, 2, 3, 1, 4).contiguous()
        self.scale = scale.float().view(tiles, TILE, blocks).transpose(1, 2).contiguous()
        self.out_features, self.in_features = n, k
        self._kernel = native.library().q8_head
        self._weight_args = (self.q.data_ptr(), self.scale.data_ptr(), n, k)
        self.norm: torch.Tensor | None = None
        self._norm_args: tuple[int | None, float] = (None, 0.0)
        self._threads = torch.get_num_threads()

    def fuse_norm(self, weight: torch.Tensor, eps: float) -> None:
        self.norm = weight.float().contiguous()
        self._norm_args = (self.norm.data_ptr(), eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        out = x.new_empty((x.shape[0], self.out_features))
        self._kernel(*self._weight_args, x.data_ptr(), x.shape[0], *self._norm_args, out.data_ptr(), self._threads)
        return out
