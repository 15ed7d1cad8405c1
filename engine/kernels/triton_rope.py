"""One layer's new tokens from the fused q/k/v projection to the cache in one Triton kernel (CUDA; the tests run it
on CPU tensors under ``TRITON_INTERPRET=1``): Qwen3's per-head RMSNorm of q and k, rotate-half RoPE, Qwen-1's logN
query scale, and the write of keys and values into their cache slots. Done with torch ops, that is eight or more
small kernels per layer, which at batch 1 cost as much time as the layer's matrix products.

One program per (token, head): query heads write the rotated query, key heads write the rotated key and the value
of the same KV head. Arithmetic in fp32, rounded once on store. An 8-bit cache (int8 or fp8 e4m3) gets each row
scaled by its peak as ``kv_store.quantize_rows`` does (int8 rounded half to even by adding and taking away 1.5 * 2^23)
and the row's fp32 scale beside it.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from engine.kv_store import LARGEST

if TYPE_CHECKING:
    from engine.kv_store import LayerCache
    from engine.layers import RMSNorm


def fits(head_dim: int) -> bool:
    """Power-of-two head sizes (``tl.arange`` over each half)."""
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256


@cache
def _kernel() -> Any:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_store(qkv_ptr, cos_ptr, sin_ptr, logn_ptr, slots_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr, k_ptr, v_ptr,
                   k_scale_ptr, v_scale_ptr, eps, stride_t, stride_c, stride_qt, stride_ks, stride_kh, stride_ss,
                   HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NORM: tl.constexpr,
                   LOGN: tl.constexpr, LARGEST: tl.constexpr, INT8: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)
        dims = tl.arange(0, HEAD_DIM)
        row = qkv_ptr + token * stride_t + head * HEAD_DIM  # q heads, then k heads: head h at h * HEAD_DIM
        other_half = (dims + HEAD_DIM // 2) % HEAD_DIM
        x = tl.load(row + dims).to(tl.float32)
        swapped = tl.load(row + other_half).to(tl.float32)  # the other half, rotated in
        if NORM:  # Qwen3: RMSNorm over each head before RoPE, q and k with their own weights
            inverse = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
            is_query = head < HEADS
            x = x * inverse * tl.where(is_query, tl.load(q_norm_ptr + dims), tl.load(k_norm_ptr + dims)).to(tl.float32)
            swapped = swapped * inverse * tl.where(is_query, tl.load(q_norm_ptr + other_half),
                                                   tl.load(k_norm_ptr + other_half)).to(tl.float32)
        factors = token * stride_c + dims
        cos = tl.load(cos_ptr + factors).to(tl.float32)
        sin = tl.load(sin_ptr + factors).to(tl.float32)  # the runner negates the first half of sin
        y = x * cos + swapped * sin
        if head < HEADS:
            if LOGN:
                y = y * tl.load(logn_ptr + token).to(tl.float32)
            tl.store(q_out_ptr + token * stride_qt + head * HEAD_DIM + dims, y.to(q_out_ptr.dtype.element_ty))
        else:
            kv_head = head - HEADS
            slot = tl.load(slots_ptr + token).to(tl.int64)
            value = tl.load(row + KV_HEADS * HEAD_DIM + dims).to(tl.float32)  # the value head: KV_HEADS heads on
            for part in tl.static_range(2):  # the key, then the value
                if part == 0:
                    stored, cache_ptr, scale_ptr = y, k_ptr, k_scale_ptr
                else:
                    stored, cache_ptr, scale_ptr = value, v_ptr, v_scale_ptr
                cache_ptr = cache_ptr + slot * stride_ks + kv_head * stride_kh + dims
                if LARGEST == 0.0:
                    tl.store(cache_ptr, stored.to(cache_ptr.dtype.element_ty))
                else:  # scaled by the row's peak to 8 bits, the scale beside it
                    peak = tl.max(tl.abs(stored), axis=0)
                    scaled = stored * tl.where(peak > 0, LARGEST / peak, 0.0)
                    if INT8:
                        scaled = (scaled + 12582912.0) - 12582912.0  # round half to even (exact for |x| < 2^22)
                    tl.store(cache_ptr, scaled.to(cache_ptr.dtype.element_ty))
                    tl.store(scale_ptr + slot * stride_ss + kv_head, peak / LARGEST)

    return rope_store


class TritonRopeStore:
    """Rotated (and normed, logN-scaled) queries out, rotated keys and values into the cache, in one launch."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None,
                 slots: torch.Tensor, cache: LayerCache, q_norm: RMSNorm | None,
                 k_norm: RMSNorm | None) -> torch.Tensor:
        """``qkv`` [N, (heads + 2 kv_heads) * D] (unit stride in the features); ``cos``/``sin`` [N, 1, D] as the
        runner builds them; ``logn`` [N, 1, 1] or None; ``slots`` [N] cache slots; ``cache`` keys and values
        [slots, kv_heads, D] in the model's dtype, or int8/fp8 with fp32 scales [slots, kv_heads]; ``q_norm``/
        ``k_norm`` Qwen3's head norms or None. Returns the queries [N, heads, D]."""
        tokens = qkv.shape[0]
        q = qkv.new_empty((tokens, self.num_heads, self.head_dim))
        norms = (q_norm, k_norm) if q_norm is not None and k_norm is not None else None
        assert cache.k.stride() == cache.v.stride(), "keys and values are laid out alike"
        scales = (cache.k_scale, cache.v_scale) if cache.k_scale is not None and cache.v_scale is not None else None
        k_scale, v_scale = scales or (cos, cos)  # any pointer: unused without 8 bits
        _kernel()[(tokens, self.num_heads + self.num_kv_heads)](
            qkv, cos, sin, cos if logn is None else logn, slots,
            *((norms[0].weight, norms[1].weight) if norms else (cos, cos)), q, cache.k, cache.v, k_scale, v_scale,
            norms[0].eps if norms else 0.0, qkv.stride(0), cos.stride(0), q.stride(0), cache.k.stride(0),
            cache.k.stride(1), k_scale.stride(0), HEADS=self.num_heads, KV_HEADS=self.num_kv_heads,
            HEAD_DIM=self.head_dim, NORM=norms is not None, LOGN=logn is not None,
            LARGEST=LARGEST[cache.k.dtype] if scales else 0.0, INT8=cache.k.dtype == torch.int8)
        return q
