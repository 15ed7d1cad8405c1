"""A decode step's attention read straight from the paged KV cache (``paged_decode_attention`` in
``quant_matmul.cpp``): the per-head norms, RoPE, the cache write and attention in one call per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.kernels import native

if TYPE_CHECKING:
    from engine.kv_store import LayerCache
    from engine.layers import RMSNorm


def fits(head_dim: int, rotated_dim: int | None = None) -> bool:
    rotated = head_dim if rotated_dim is None else rotated_dim
    return head_dim % 32 == 0 and head_dim <= 256 and rotated % 32 == 0 and 0 < rotated <= head_dim


class PagedDecodeAttention:
    """One new token per sequence: replaces the per-head norms of q and k (Qwen3, Qwen3.5: ``q_norm``/``k_norm``,
    RMSNorm modules in the activations' dtype), rotating them (over their first ``rotated_dim`` dims: partial rotary),
    writing k and v, gathering the cached keys and values into a padded batch and a masked SDPA (bf16 or fp32
    activations, as the model runs; a cache of the same type or int8 with scales; fp32 norms, RoPE, scores, softmax
    and sums, the normalised heads rounded as the model's norm rounds them); on the build for ``isa``."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, isa: str, rotated_dim: int | None = None,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> None:
        assert fits(head_dim, rotated_dim) and (q_norm is None) == (k_norm is None)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotated_dim = head_dim if rotated_dim is None else rotated_dim
        self.norms = (q_norm, k_norm) if q_norm is not None and k_norm is not None else None
        self.scale = head_dim**-0.5
        self._kernel = native.library(isa).paged_decode_attention
        self._threads = torch.get_num_threads()

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None,
                 write_slots: torch.Tensor, cache: LayerCache, kv_slots: torch.Tensor,
                 kv_lens: torch.Tensor) -> torch.Tensor:
        """``qkv`` [B, (heads + 2 kv_heads) * D]; ``cos``/``sin`` [B, 1, rotated dims] (sin's first half negated);
        ``logn`` [B, 1, 1] or None; ``write_slots`` [B]; ``cache`` the layer's keys and values (the activations'
        dtype, or int8 with scales); ``kv_slots`` [B, Tk] left-padded, ``kv_lens`` [B]. Writes the new keys and
        values; returns [B, heads * D]."""
        qkv = qkv.contiguous()
        out = qkv.new_empty((qkv.shape[0], self.num_heads * self.head_dim))
        batch, width = kv_slots.shape
        scales = (None, None) if cache.k_scale is None or cache.v_scale is None else (cache.k_scale.data_ptr(),
                                                                                      cache.v_scale.data_ptr())
        norms: tuple[int | None, int | None, float] = (None, None, 0.0)
        if self.norms is not None:
            q_norm, k_norm = self.norms
            assert q_norm.weight.dtype == qkv.dtype and q_norm.eps == k_norm.eps
            norms = (q_norm.weight.data_ptr(), k_norm.weight.data_ptr(), q_norm.eps)
        self._kernel(qkv.data_ptr(), *norms, cos.data_ptr(), sin.data_ptr(),
                     None if logn is None else logn.data_ptr(), write_slots.data_ptr(), cache.k.data_ptr(),
                     cache.v.data_ptr(), *scales, kv_slots.data_ptr(), kv_lens.data_ptr(), batch, width,
                     self.num_heads, self.num_kv_heads, self.head_dim, self.rotated_dim, self.scale,
                     int(qkv.dtype == torch.float32), out.data_ptr(), self._threads)
        return out
