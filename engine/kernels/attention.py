"""A decode step's attention read straight from the paged KV cache (``paged_decode_attention`` in
``quant_matmul.cpp``): RoPE, the cache write and attention in one call per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.kernels import native

if TYPE_CHECKING:
    from engine.kv_store import LayerCache


def fits(head_dim: int) -> bool:
    return head_dim % 32 == 0 and head_dim <= 128


class PagedDecodeAttention:
    """One new token per sequence: replaces rotating q and k, writing k and v, gathering the cached keys and
    values into a padded batch and a masked SDPA (bf16 or fp32 activations, as the model runs; a cache of the same
    type or int8 with scales; fp32 RoPE, scores, softmax and sums); on the build for ``isa``."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, isa: str) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self._kernel = native.library(isa).paged_decode_attention
        self._threads = torch.get_num_threads()

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None,
                 write_slots: torch.Tensor, cache: LayerCache, kv_slots: torch.Tensor,
                 kv_lens: torch.Tensor) -> torch.Tensor:
        """``qkv`` [B, (heads + 2 kv_heads) * D]; ``cos``/``sin`` [B, 1, D] (sin's first half negated); ``logn``
        [B, 1, 1] or None; ``write_slots`` [B]; ``cache`` the layer's keys and values (the activations' dtype, or
        int8 with scales); ``kv_slots`` [B, Tk] left-padded, ``kv_lens`` [B]. Writes the new keys and values;
        returns [B, heads * D]."""
        qkv = qkv.contiguous()
        out = qkv.new_empty((qkv.shape[0], self.num_heads * self.head_dim))
        batch, width = kv_slots.shape
        scales = (None, None) if cache.k_scale is None or cache.v_scale is None else (cache.k_scale.data_ptr(),
                                                                                      cache.v_scale.data_ptr())
        self._kernel(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), None if logn is None else logn.data_ptr(),
                     write_slots.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), *scales, kv_slots.data_ptr(),
                     kv_lens.data_ptr(), batch, width, self.num_heads, self.num_kv_heads, self.head_dim, self.scale,
                     int(qkv.dtype == torch.float32), out.data_ptr(), self._threads)
        return out
