"""4-bit weights times bf16/fp16 activations in Triton (CUDA; the tests run it on CPU tensors under
``TRITON_INTERPRET=1``).

Weights stay packed as GPTQ stores them: eight 4-bit values of consecutive input features in one int32
(``qweight`` [in / 8, out]), with a scale and an offset per group of input features and output (w = q * scale +
offset). Each program dequantizes a [BLOCK_K, BLOCK_N] tile in registers and multiplies it on the tensor cores;
when the rows are few (decode), the input axis is split over several programs that add into an fp32 output, so
that the chip is full even at one row.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from engine.weights.int4 import Int4Weight

BLOCK_K = 64  # input features per tile: a group (32 or more, a multiple of 64 here) holds whole tiles
BLOCK_N = 64
TARGET_PROGRAMS = 264  # two per multiprocessor of an H100/H200: split the input axis until the grid has this many


def fits(weight: Int4Weight) -> bool:
    out_features, in_features = weight.q.shape
    return (weight.group_size % BLOCK_K == 0 and in_features % weight.group_size == 0
            and out_features % BLOCK_N == 0)


def pack(weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(qweight int32 [in / 8, out], scales [groups, out], offsets [groups, out]) on ``device``; nibble j of a word
    is input feature 8 i + j."""
    q = weight.q.to(device).T.contiguous().to(torch.int64)  # [in, out]
    words = q.view(-1, 8, q.shape[1])
    shifts = (torch.arange(8, device=device) * 4).view(1, 8, 1)
    packed = (words << shifts).sum(dim=1)
    qweight = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (qweight, weight.scale.T.contiguous().to(device=device, dtype=dtype),
            weight.zero.T.contiguous().to(device=device, dtype=dtype))


@cache
def _kernel() -> Any:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def int4_matmul(x_ptr, qweight_ptr, scales_ptr, offsets_ptr, out_ptr, rows, in_features, out_features,
                    stride_xm, stride_qk, stride_sg, stride_om, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FP32_DOT: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for start in range(pid_k * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=row_ok[:, None], other=0.0)
            words = tl.load(qweight_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :])
            q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
            group = start // GROUP_SIZE
            scale = tl.load(scales_ptr + group * stride_sg + offs_n).to(tl.float32)
            offset = tl.load(offsets_ptr + group * stride_sg + offs_n).to(tl.float32)
            w = (q.to(tl.float32) * scale[None, :] + offset[None, :]).to(x.dtype)
            if FP32_DOT:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.atomic_add(out, acc, mask=row_ok[:, None])

    return int4_matmul


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter. Its dot of 16-bit floats is wrong (triton 3.9), so there
    the tile product runs in fp32 on the same bf16/fp16 values: the tensor cores' arithmetic (exact products, fp32
    sums) in another order."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_rows(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def split_k(rows: int, in_features: int, out_features: int) -> int:
    """How many programs share one tile's input axis: enough to reach ``TARGET_PROGRAMS``, at most one per tile."""
    tiles = -(-rows // block_rows(rows)) * (out_features // BLOCK_N)
    split = 1
    while tiles * split * 2 <= TARGET_PROGRAMS and split * 2 <= in_features // BLOCK_K:
        split *= 2
    return split


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """``x`` [rows, in] (unit stride in ``in``) times the packed weight: [rows, out] in ``x``'s dtype."""
    rows, in_features = x.shape
    out_features = qweight.shape[1]
    block_m, split = block_rows(rows), split_k(rows, in_features, out_features)
    if split == 1:
        out = x.new_empty((rows, out_features))
    else:
        out = torch.zeros((rows, out_features), dtype=torch.float32, device=x.device)
    grid = (-(-rows // block_m), out_features // BLOCK_N, split)
    _kernel()[grid](x, qweight, scales, offsets, out, rows, in_features, out_features, x.stride(0),
                    qweight.stride(0), scales.stride(0), out.stride(0), GROUP_SIZE=group_size, BLOCK_M=block_m,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=split, FP32_DOT=interpreted())
    return out if split == 1 else out.to(x.dtype)
