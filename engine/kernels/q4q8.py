"""4-bit weights times 8-bit activations (``q4q8_linear`` in ``quant_matmul.cpp``): packing and calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import native
from engine.weights.int4 import Int4Weight

BLOCK, TILE = 32, 16
# The amx build computes steps of at least this many rows on AMX tiles, with the same bits (Xeon 6 model 167,
# 16384 x 2048 Q4_0 from memory, 40 matrices in turn: tiles 2.3 ms at 8 rows, 2.7 at 16, 4.9 at 32; the vector
# kernel 1.4 at 4, 1.6 at 8, 2.7 at 16, 5.0 at 32).
TILE_ROWS = 16


def fits(weight: Int4Weight) -> bool:
    """The kernel takes whole tiles of 16 outputs and groups that are whole blocks of 32 inputs."""
    out_features, in_features = weight.q.shape
    return (out_features % TILE == 0 and in_features % BLOCK == 0 and weight.group_size % BLOCK == 0
            and in_features % weight.group_size == 0)


@dataclass
class PackedQ4:
    """A weight in the kernel's layout: per tile of 16 outputs, per block of 32 inputs, 8 steps of 4 inputs
    (32 bytes, two nibbles each); per tile and group of inputs, 16 scales and 16 offsets (w = q * scale + offset)."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    out_features: int
    in_features: int
    group_size: int


def pack(weight: Int4Weight) -> PackedQ4:
    n, k = weight.q.shape
    tiles, blocks = n // TILE, k // BLOCK
    # element e of a 64-byte step is output e // 4, input e % 4; byte i holds elements i and i + 32
    steps = weight.q.view(tiles, TILE, blocks, BLOCK // 4, 4).permute(0, 2, 3, 1, 4).reshape(tiles, blocks, 8, 64)
    packed = (steps[..., :32] | (steps[..., 32:] << 4)).contiguous()

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return values.float().view(tiles, TILE, -1).transpose(1, 2).contiguous()

    return PackedQ4(packed, per_group(weight.scale), per_group(weight.zero), n, k, weight.group_size)


class Q4Q8Matmul(native.RowKernel):
    """``y = norm?(x) @ W^T (+ bias)`` for rows ``x`` [M, in] -> [M, out] in ``dtype`` (bf16, or fp32 for a model
    run in fp32), on the build for ``isa``."""

    def __init__(self, weight: PackedQ4, bias: torch.Tensor | None, isa: str,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.weight, self.bias = weight, None if bias is None else bias.float().contiguous()
        super().__init__(native.library(isa).q4q8_linear,
                         (weight.q.data_ptr(), weight.scale.data_ptr(), weight.offset.data_ptr(),
                          None if self.bias is None else self.bias.data_ptr(), weight.out_features,
                          weight.in_features, weight.group_size // BLOCK, int(dtype == torch.float32),
                          TILE_ROWS),
                         weight.out_features, dtype, dtype, fusable=True)
