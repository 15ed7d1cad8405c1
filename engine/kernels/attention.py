"""Decode attention read straight from the paged KV cache (``paged_decode_attention`` in ``quant_matmul.cpp``)."""

from __future__ import annotations

import torch

from engine.kernels import native


def fits(head_dim: int) -> bool:
    return head_dim % 16 == 0 and head_dim <= 128


class PagedDecodeAttention:
    """One new query per sequence against its cached keys: replaces gathering the keys and values into a padded
    batch and a masked SDPA (bf16 caches; fp32 scores, softmax and sums)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self._kernel = native.library().paged_decode_attention
        self._threads = torch.get_num_threads()

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
                 kv_lens: torch.Tensor) -> torch.Tensor:
        """``q`` [B, heads, D]; caches [slots, kv_heads, D]; ``kv_slots`` [B, Tk] left-padded; ``kv_lens`` [B].
        Returns [B, heads * D]."""
        q = q.contiguous()
        out = q.new_empty((q.shape[0], self.num_heads * self.head_dim))
        batch, width = kv_slots.shape
        self._kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_slots.data_ptr(), kv_lens.data_ptr(),
                     batch, width, self.num_heads, self.num_kv_heads, self.head_dim, self.scale, out.data_ptr(),
                     self._threads)
        return out
