"""Decode attention straight from the paged KV cache, in Triton (CUDA; the tests run it on CPU tensors under
``TRITON_INTERPRET=1``).

One program per (sequence, query head) walks its sequence's keys a tile at a time, looking up each key's cache
page in the block table, with an online softmax in fp32. Its inputs have fixed shapes (block tables padded to the
longest context the engine allows, key counts read on the device), so a decode step that uses it can be captured
in a CUDA graph; the cache keeps its 16-token pages, so prefix sharing keeps its grain.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.kv_store import LayerCache

TILE = 64  # keys per loop iteration


def fits(head_dim: int, block_size: int) -> bool:
    """Power-of-two head sizes up to 256 (``tl.arange``) and pages."""
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256 and block_size & (block_size - 1) == 0


def available() -> bool:
    """Whether Triton imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _kernel() -> Any:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, out_ptr, tables_ptr, lens_ptr, scale,
                     stride_qb, stride_qh, stride_ks, stride_kh, stride_ss, stride_tb, stride_ob, stride_oh,
                     GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
                     QUANTIZED: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        length = tl.load(lens_ptr + row)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims).to(tl.float32) * scale
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(0, length, TILE):
            position = start + tl.arange(0, TILE)
            valid = position < length
            page = tl.load(tables_ptr + row * stride_tb + position // BLOCK_SIZE, mask=valid, other=0)
            slot = page.to(tl.int64) * BLOCK_SIZE + position % BLOCK_SIZE
            offsets = slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
            keys = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
            if QUANTIZED:  # int8 rows, one fp32 scale per slot and head
                rows = slot * stride_ss + kv_head
                keys = keys * tl.load(k_scale_ptr + rows, mask=valid, other=0.0)[:, None]
                values = values * tl.load(v_scale_ptr + rows, mask=valid, other=0.0)[:, None]
            scores = tl.where(valid, tl.sum(keys * q[None, :], axis=1), float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_best)
            rescale = tl.exp(best - new_best)
            acc = acc * rescale + tl.sum(weights[:, None] * values, axis=0)
            total = total * rescale + tl.sum(weights, axis=0)
            best = new_best
        out = acc / total
        tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))

    return paged_decode


class TritonPagedAttention:
    """One query per sequence over its keys in the paged cache (the new key already written)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        self.num_heads, self.group, self.head_dim = num_heads, num_heads // num_kv_heads, head_dim
        self.block_size = block_size
        self.scale = head_dim**-0.5

    def __call__(self, q: torch.Tensor, cache: LayerCache, block_tables: torch.Tensor,
                 kv_lens: torch.Tensor) -> torch.Tensor:
        """``q`` [B, heads, D] (rotated, logN applied); ``cache`` the layer's keys and values [slots, kv_heads, D]
        (unit stride in D; the queries' dtype, or int8 with scales [slots, kv_heads]); ``block_tables`` [B, W] int32
        pages; ``kv_lens`` [B] int32, at least 1. Returns [B, heads * D]."""
        batch = q.shape[0]
        out = q.new_empty((batch, self.num_heads, self.head_dim))
        quantized = cache.k_scale is not None and cache.v_scale is not None
        k_scale = cache.k_scale if quantized else cache.k  # any pointer: unread without QUANTIZED
        v_scale = cache.v_scale if quantized else cache.v
        _kernel()[(batch, self.num_heads)](
            q, cache.k, cache.v, k_scale, v_scale, out, block_tables, kv_lens, self.scale,
            q.stride(0), q.stride(1), cache.k.stride(0), cache.k.stride(1), k_scale.stride(0),
            block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=self.group, BLOCK_SIZE=self.block_size, HEAD_DIM=self.head_dim, TILE=TILE, QUANTIZED=quantized)
        return out.view(batch, -1)
