"""RMSNorm and SwiGLU's silu(gate) * up as one Triton kernel each (CUDA; the tests run them on CPU tensors under
``TRITON_INTERPRET=1``). At batch 1 torch's RMSNorm takes ~6 us per call on an H200 (one row reduced by one
block) and SwiGLU's activation is two kernels; these are the small kernels a decode step launches most.

Both compute in fp32 and round once on store, as torch's fused RMSNorm does.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch


def _block(size: int) -> int:
    return 1 << (size - 1).bit_length()


@cache
def _kernels() -> tuple[Any, Any]:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how they run."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rows(x_ptr, weight_ptr, out_ptr, size, eps, stride_x, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        inside = columns < size
        x = tl.load(x_ptr + row * stride_x + columns, mask=inside, other=0.0).to(tl.float32)
        inverse = tl.rsqrt(tl.sum(x * x, axis=0) / size + eps)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + columns, (x * inverse * weight).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def silu_and_mul_rows(gate_up_ptr, out_ptr, size, stride_g, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < size
        gate = tl.load(gate_up_ptr + row * stride_g + columns, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_g + size + columns, mask=inside, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_o + columns, out.to(out_ptr.dtype.element_ty), mask=inside)

    return rms_norm_rows, silu_and_mul_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis of ``x`` (unit stride there)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    _kernels()[0][(rows.shape[0],)](rows, weight, out, rows.shape[1], eps, rows.stride(0), out.stride(0),
                                    BLOCK=_block(rows.shape[1]), num_warps=8)
    return out.view(x.shape)


SILU_BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up`` [..., 2 * size] holding gate then up (unit stride in the last axis)."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    size = rows.shape[1] // 2
    out = rows.new_empty((rows.shape[0], size))
    _kernels()[1][(rows.shape[0], -(-size // SILU_BLOCK))](rows, out, size, rows.stride(0), out.stride(0),
                                                          BLOCK=SILU_BLOCK)
    return out.view(*gate_up.shape[:-1], size)
