"""One layer's new tokens from the fused q/k/v projection to the cache in one Triton kernel (CUDA; the tests run it
on CPU tensors under ``TRITON_INTERPRET=1``): Qwen3's per-head RMSNorm of q and k, rotate-half RoPE, Qwen-1's logN
query scale, and the write of keys and values into their cache slots. Done with torch ops, that is eight or more
small kernels per layer, which at batch 1 cost as much time as the layer's matrix products.

One program per (token, head): query heads write the rotated query, key heads write the rotated key and the value
of the same KV head. Arithmetic in fp32, rounded once on store. Caches in the model's dtype only (an int8 cache
takes the torch path).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import torch

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
                   eps, stride_t, stride_c, stride_qt, stride_ks, stride_kh, HEADS: tl.constexpr,
                   KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NORM: tl.constexpr, LOGN: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)
        half = tl.arange(0, HEAD_DIM // 2)
        row = qkv_ptr + token * stride_t + head * HEAD_DIM  # q heads, then k heads: head h at h * HEAD_DIM
        x1 = tl.load(row + half).to(tl.float32)
        x2 = tl.load(row + HEAD_DIM // 2 + half).to(tl.float32)
        if NORM:  # Qwen3: RMSNorm over each head before RoPE, q and k with their own weights
            inverse = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
            is_query = head < HEADS
            w1 = tl.where(is_query, tl.load(q_norm_ptr + half), tl.load(k_norm_ptr + half)).to(tl.float32)
            w2 = tl.where(is_query, tl.load(q_norm_ptr + HEAD_DIM // 2 + half),
                          tl.load(k_norm_ptr + HEAD_DIM // 2 + half)).to(tl.float32)
            x1 = x1 * inverse * w1
            x2 = x2 * inverse * w2
        factors = token * stride_c + half
        cos1 = tl.load(cos_ptr + factors).to(tl.float32)
        cos2 = tl.load(cos_ptr + factors + HEAD_DIM // 2).to(tl.float32)
        sin1 = tl.load(sin_ptr + factors).to(tl.float32)  # the runner negates the first half of sin
        sin2 = tl.load(sin_ptr + factors + HEAD_DIM // 2).to(tl.float32)
        y1 = x1 * cos1 + x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
        if head < HEADS:
            if LOGN:
                scale = tl.load(logn_ptr + token).to(tl.float32)
                y1 = y1 * scale
                y2 = y2 * scale
            out = q_out_ptr + token * stride_qt + head * HEAD_DIM
            tl.store(out + half, y1.to(q_out_ptr.dtype.element_ty))
            tl.store(out + HEAD_DIM // 2 + half, y2.to(q_out_ptr.dtype.element_ty))
        else:
            kv_head = head - HEADS
            slot = tl.load(slots_ptr + token).to(tl.int64)
            key = k_ptr + slot * stride_ks + kv_head * stride_kh
            tl.store(key + half, y1.to(k_ptr.dtype.element_ty))
            tl.store(key + HEAD_DIM // 2 + half, y2.to(k_ptr.dtype.element_ty))
            dims = tl.arange(0, HEAD_DIM)
            value = tl.load(row + KV_HEADS * HEAD_DIM + dims)  # the value head sits KV_HEADS heads after its key
            tl.store(v_ptr + slot * stride_ks + kv_head * stride_kh + dims, value.to(v_ptr.dtype.element_ty))

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
        [slots, kv_heads, D] in the model's dtype; ``q_norm``/``k_norm`` Qwen3's head norms or None. Returns the
        queries [N, heads, D]."""
        tokens = qkv.shape[0]
        q = qkv.new_empty((tokens, self.num_heads, self.head_dim))
        norm = q_norm is not None and k_norm is not None
        weights = (q_norm.weight, k_norm.weight) if q_norm is not None and k_norm is not None else (cos, cos)
        assert cache.k.stride() == cache.v.stride(), "keys and values are laid out alike"
        _kernel()[(tokens, self.num_heads + self.num_kv_heads)](
            qkv, cos, sin, cos if logn is None else logn, slots, *weights, q, cache.k, cache.v,
            q_norm.eps if q_norm is not None else 0.0, qkv.stride(0), cos.stride(0), q.stride(0), cache.k.stride(0),
            cache.k.stride(1), HEADS=self.num_heads, KV_HEADS=self.num_kv_heads, HEAD_DIM=self.head_dim, NORM=norm,
            LOGN=logn is not None)
        return q
