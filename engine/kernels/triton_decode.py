"""Decode attention straight from the paged KV cache, in Triton (CUDA; the tests run it on CPU tensors under
``TRITON_INTERPRET=1``).

Each (sequence, query head) has its keys split among ``splits`` programs (flash-decoding: at batch 1 one program
per head would leave most of the chip idle); each program walks its share a tile at a time, looking up each key's
cache page in the block table, with an online softmax in fp32, and a second kernel merges the shares by their
maxima and sums. The shares are cut from the key count read on the device, and the grid depends only on the batch,
so inputs have fixed shapes (block tables padded to the longest context the engine allows) and a decode step that
uses it can be captured in a CUDA graph; the cache keeps its 16-token pages, so prefix sharing keeps its grain.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.kv_store import LayerCache

TILE = 32  # keys per loop iteration
TARGET_PROGRAMS = 528  # four per multiprocessor of an H100/H200: split the keys until the grid has about this many
MAX_SPLITS = 16


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


def splits_for(rows: int, heads: int) -> int:
    """How many programs share one (sequence, head)'s keys: a power of two up to ``MAX_SPLITS``, doubled while the
    grid stays within ``TARGET_PROGRAMS``."""
    split = 1
    while rows * heads * split * 2 <= TARGET_PROGRAMS and split < MAX_SPLITS:
        split *= 2
    return split


@cache
def _kernels() -> tuple[Any, Any]:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how they run."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, out_ptr, part_ptr, tables_ptr, lens_ptr, scale,
                     stride_qb, stride_qh, stride_ks, stride_kh, stride_ss, stride_tb, stride_ob, stride_oh,
                     GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
                     SPLITS: tl.constexpr, QUANTIZED: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        share = tl.program_id(2)
        kv_head = head // GROUP
        length = tl.load(lens_ptr + row)
        span = tl.cdiv(tl.cdiv(length, SPLITS), TILE) * TILE
        begin = share * span
        end = tl.minimum(begin + span, length)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims).to(tl.float32) * scale
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(begin, end, TILE):
            position = start + tl.arange(0, TILE)
            valid = position < end
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
        if SPLITS == 1:
            tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, (acc / total).to(out_ptr.dtype.element_ty))
        else:  # [rows, heads, SPLITS, HEAD_DIM + 2]: the unnormalized output, the share's maximum and sum
            part = part_ptr + ((row * tl.num_programs(1) + head) * SPLITS + share) * (HEAD_DIM + 2)
            tl.store(part + dims, acc)
            tl.store(part + HEAD_DIM, best)
            tl.store(part + HEAD_DIM + 1, total)

    @triton.jit
    def merge_shares(part_ptr, out_ptr, stride_ob, stride_oh, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        shares = tl.arange(0, SPLITS)
        dims = tl.arange(0, HEAD_DIM)
        part = part_ptr + ((row * tl.num_programs(1) + head) * SPLITS + shares) * (HEAD_DIM + 2)
        best = tl.load(part + HEAD_DIM)
        total = tl.load(part + HEAD_DIM + 1)
        acc = tl.load(part[:, None] + dims[None, :])
        weights = tl.exp(best - tl.max(best, axis=0))  # an empty share (max -inf) weighs 0
        out = tl.sum(weights[:, None] * acc, axis=0) / tl.sum(weights * total, axis=0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))

    return paged_decode, merge_shares


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
        splits = splits_for(batch, self.num_heads)
        parts = q.new_empty((batch, self.num_heads, splits, self.head_dim + 2), dtype=torch.float32) \
            if splits > 1 else out  # any pointer: unused with one share
        paged_decode, merge_shares = _kernels()
        paged_decode[(batch, self.num_heads, splits)](
            q, cache.k, cache.v, k_scale, v_scale, out, parts, block_tables, kv_lens, self.scale,
            q.stride(0), q.stride(1), cache.k.stride(0), cache.k.stride(1), k_scale.stride(0),
            block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=self.group, BLOCK_SIZE=self.block_size, HEAD_DIM=self.head_dim, TILE=TILE, SPLITS=splits,
            QUANTIZED=quantized)
        if splits > 1:
            merge_shares[(batch, self.num_heads)](parts, out, out.stride(0), out.stride(1), HEAD_DIM=self.head_dim,
                                                   SPLITS=splits)
        return out.view(batch, -1)
