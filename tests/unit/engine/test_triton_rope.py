"""The fused norm/RoPE/logN/cache-write kernel (under ``TRITON_INTERPRET=1`` where there is no GPU) against the same
arithmetic in fp64."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first built

from engine.kernels import triton_decode
from engine.kernels.triton_rope import TritonRopeStore
from engine.kv_store import LayerCache
from engine.layers import RMSNorm

pytestmark = pytest.mark.skipif(not triton_decode.available(), reason="needs triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SLOTS = torch.tensor([7, 3, 12, 0, 9])


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def expected(qkv, cos, sin, logn, norms, heads: int, kv_heads: int, dim: int):
    """(queries, keys, values) in fp64 from the kernel's inputs."""
    tokens = qkv.shape[0]
    x = qkv.double().view(tokens, -1, dim)
    qk = x[:, : heads + kv_heads]
    if norms is not None:
        q_weight, k_weight = (n.weight.cpu().double() for n in norms)
        weights = torch.cat([q_weight.expand(heads, dim), k_weight.expand(kv_heads, dim)])
        qk = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + norms[0].eps) * weights
    qk = rotate_half(qk, cos.double(), sin.double())
    q = qk[:, :heads] * (1.0 if logn is None else logn.double())
    return q, qk[:, heads:], x[:, heads + kv_heads :]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (2, 2, 128)])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "head-norms"])
@pytest.mark.parametrize("logn", [False, True], ids=["no-logn", "logn"])
def test_kernel_matches_fp64_and_writes_only_its_slots(dtype, bound, heads, kv_heads, dim, norm, logn):
    """Queries and cached keys within 1e-6 (fp32: a few ulp of other summation orders) or 2^-8 (bf16: the output
    rounding) of fp64, relative; values copied bit for bit; every other cache slot untouched."""
    generator = torch.Generator().manual_seed(heads * dim + 2 * norm + logn)
    tokens = len(SLOTS)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    angles = torch.rand(tokens, dim // 2, generator=generator) * 6
    cos = angles.cos().repeat(1, 2)[:, None, :].to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)[:, None, :].to(dtype)
    scale = (torch.rand(tokens, 1, 1, generator=generator) + 0.5).to(dtype) if logn else None
    norms = None
    if norm:
        norms = (RMSNorm(dim, 1e-6, dtype), RMSNorm(dim, 1e-6, dtype))
        for module in norms:
            module.weight.data = (torch.rand(dim, generator=generator) + 0.5).to(dtype)
    cache = LayerCache(*(torch.zeros(16, kv_heads, dim, dtype=dtype, device=DEVICE) for _ in "kv"), None, None)
    on_device = [None if t is None else t.to(DEVICE) for t in (qkv, cos, sin, scale)]
    if norms is not None:
        for module in norms:
            module.to(DEVICE)
    q = TritonRopeStore(heads, kv_heads, dim)(*on_device, SLOTS.to(DEVICE), cache, *(norms or (None, None)))
    want_q, want_k, want_v = expected(qkv, cos, sin, scale, norms, heads, kv_heads, dim)
    assert q.dtype == dtype and q.shape == (tokens, heads, dim)
    assert ((q.cpu().double() - want_q).norm() / want_q.norm()).item() < bound
    keys, values = cache.k.cpu(), cache.v.cpu()
    assert ((keys[SLOTS].double() - want_k).norm() / want_k.norm()).item() < bound
    assert torch.equal(values[SLOTS], want_v.to(dtype))
    others = torch.ones(16, dtype=torch.bool)
    others[SLOTS] = False
    assert not keys[others].any() and not values[others].any()
