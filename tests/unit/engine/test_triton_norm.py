"""RMSNorm and SwiGLU's activation on their Triton kernels (under ``TRITON_INTERPRET=1`` where there is no GPU)
against fp64."""

from __future__ import annotations

import os

import pytest
import torch

from engine.kernels import triton_norm

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative error: fp32, other summation orders; bf16, the output's rounding: half an ulp (2^-8) on a GPU, a whole ulp
# (2^-7) under the interpreter, which truncates fp32 to bf16 (triton 3.9) where the GPU rounds to nearest
BF16_BOUND = 2**-8 if DEVICE.type == "cuda" else 2**-7
BOUNDS = [(torch.float32, 1e-6), (torch.bfloat16, BF16_BOUND)]


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.cpu().double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype,bound", BOUNDS)
@pytest.mark.parametrize("rows,size", [(1, 64), (3, 96), (5, 1000)])
def test_rms_norm_matches_fp64(dtype, bound, rows, size):
    """Rows of a power-of-two width and of others (masked tail), a weight in the activations' dtype."""
    generator = torch.Generator().manual_seed(rows * size)
    x = (torch.randn(rows, size, generator=generator) * 3).to(dtype)
    weight = (torch.rand(size, generator=generator) + 0.5).to(dtype)
    out = triton_norm.rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-6)
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, expected) < bound


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's exp(200)
@pytest.mark.parametrize("dtype,bound", BOUNDS)
@pytest.mark.parametrize("rows,size", [(1, 96), (4, 1500)])
def test_silu_and_mul_matches_fp64(dtype, bound, rows, size):
    """One column block and two (the second partly masked); large negative gates give zero, not NaN."""
    generator = torch.Generator().manual_seed(rows * size)
    gate_up = (torch.randn(rows, 2 * size, generator=generator) * 4).to(dtype)
    gate_up[0, 0] = -200.0
    out = triton_norm.silu_and_mul(gate_up.to(DEVICE))
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert out.dtype == dtype and out.shape == (rows, size) and torch.isfinite(out).all()
    assert relative_error(out, expected) < bound
