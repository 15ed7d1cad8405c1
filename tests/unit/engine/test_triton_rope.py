"""The fused norm/RoPE/logN/cache-write kernel (under ``TRITON_INTERPRET=1`` where there is no GPU) against the same
arithmetic in fp64."""

from __future__ import annotations

import os

import pytest
import torch

from engine.kernels.triton_rope import TritonRopeStore
from engine.kv_store import LayerCache
from engine.layers import RMSNorm

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it
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


def eight_bit_bound(want: torch.Tensor, eight_bit: torch.dtype) -> torch.Tensor:
    """How far a row read back from an 8-bit cache may be from the fp64 row: half a step of its peak / 127 for int8
    (and fp32 slop); for fp8 half an ulp of e4m3 (2^-4 of the value, subnormals below 2^-6 of the scale) on a GPU,
    on a GPU."""
    peak = want.abs().amax(-1, keepdim=True)
    if eight_bit == torch.int8:
        return peak / 254 + peak * 1e-5
    return want.abs() * 2**-4 + peak / 448 * 2**-10 + peak * 1e-5


# triton 3.9's interpreter converts fp32 to fp8 wrongly (-127.97 becomes -64), so fp8 writes are checked on a GPU
INTERPRETED_FP8 = pytest.mark.skipif(DEVICE.type == "cpu", reason="the Triton interpreter's fp32-to-fp8 conversion "
                                     "is wrong; fp8 writes are checked on a GPU")


@pytest.mark.parametrize("eight_bit", [torch.int8, pytest.param(torch.float8_e4m3fn, marks=INTERPRETED_FP8)],
                         ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_8bit_cache_gets_each_row_scaled_by_its_peak(eight_bit, dtype):
    """Keys (rotated, Qwen3-normed) and values written as 8 bits with a scale of peak / 127 (int8) or peak / 448
    (fp8) per slot and head: read back within the format's rounding of the fp64 rows; queries as without a cache
    format; other slots untouched."""
    heads, kv_heads, dim, tokens = 4, 2, 64, len(SLOTS)
    generator = torch.Generator().manual_seed(11)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator) * 3).to(dtype)
    angles = torch.rand(tokens, dim // 2, generator=generator) * 6
    cos = angles.cos().repeat(1, 2)[:, None, :].to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)[:, None, :].to(dtype)
    norms = (RMSNorm(dim, 1e-6, dtype), RMSNorm(dim, 1e-6, dtype))
    for module in norms:
        module.weight.data = (torch.rand(dim, generator=generator) + 0.5).to(dtype)
    cache = LayerCache(*(torch.zeros(16, kv_heads, dim, dtype=eight_bit, device=DEVICE) for _ in "kv"),
                       *(torch.zeros(16, kv_heads, device=DEVICE) for _ in "kv"))
    q = TritonRopeStore(heads, kv_heads, dim)(qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), None,
                                              SLOTS.to(DEVICE), cache, *(n.to(DEVICE) for n in norms))
    want_q, want_k, want_v = expected(qkv, cos, sin, None, norms, heads, kv_heads, dim)
    assert ((q.cpu().double() - want_q).norm() / want_q.norm()).item() < (1e-6 if dtype == torch.float32 else 2**-7)
    host = LayerCache(*(t.cpu() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)))
    keys, values = host.read(SLOTS, torch.float64)
    largest = 127 if eight_bit == torch.int8 else 448
    for read, want, scale in ((keys, want_k, host.k_scale), (values, want_v, host.v_scale)):
        assert (read - want).abs().le(eight_bit_bound(want, eight_bit)).all()
        torch.testing.assert_close(scale[SLOTS].double(), want.abs().amax(-1) / largest, rtol=1e-5, atol=0)
    others = torch.ones(16, dtype=torch.bool)
    others[SLOTS] = False
    assert not host.k.view(torch.uint8)[others].any() and not host.k_scale[others].any()
