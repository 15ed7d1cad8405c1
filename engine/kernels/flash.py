"""flash-attn's varlen kernel on CUDA, used when the ``flash_attn`` package is installed.

Keys and values are gathered from the paged cache into one packed tensor (each sequence's keys in order) and
handed to ``flash_attn_varlen_func`` with offsets, so no row is padded and no mask is built. The paged form of
the kernel (``block_table``) is not used: flash-attn 2 needs pages of 256 tokens, and the cache's blocks are
smaller so that prefixes are shared at a finer grain.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch

from engine.device import cuda_capability

if TYPE_CHECKING:
    from engine.kv_store import LayerCache
    from engine.model import VarlenLayout


class VarlenKernel(Protocol):
    """``flash_attn_varlen_func``'s signature, as far as it is used here."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, softmax_scale: float,
                 causal: bool) -> torch.Tensor: ...


def flash_kernel() -> VarlenKernel | None:
    """``flash_attn_varlen_func`` when flash-attn imports (a build for another torch fails to load), else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):
        return None
    return flash_attn_varlen_func


def fits(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether flash-attn 2 takes this model: CUDA from sm80 (Ampere on), fp16/bf16, head size a multiple of 8 up
    to 256."""
    return (device.type == "cuda" and cuda_capability(device) >= (8, 0) and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256)


class VarlenAttention:
    """Causal attention of packed queries over packed keys gathered from the paged cache."""

    def __init__(self, kernel: VarlenKernel, head_dim: int) -> None:
        self.kernel = kernel
        self.scale = 1 / math.sqrt(head_dim)

    def __call__(self, q: torch.Tensor, cache: LayerCache, layout: VarlenLayout) -> torch.Tensor:
        """``q``: [N, heads, D] (rotated, logN applied); ``cache``: the layer's keys and values. Returns
        [N, heads * D]."""
        keys, values = cache.read(layout.kv_slots, q.dtype)
        out = self.kernel(q.contiguous(), keys, values, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_q,
                          layout.max_k, softmax_scale=self.scale, causal=True)
        return out.reshape(q.shape[0], -1)
