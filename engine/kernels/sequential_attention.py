"""Varlen attention on CPU for steps that hold prompts: torch SDPA once per sequence, each over its own keys, with
the causal mask aligned to the last key (a chunk of a prompt sees every key before it). Nothing is padded, so a
decode row in the same step costs its one query, not a prompt's length. Matches ``flash.VarlenKernel``."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn import functional as F


def sequential_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, softmax_scale: float,
                      causal: bool) -> torch.Tensor:
    """``q`` [N, heads, D] packed queries, ``k``/``v`` [K, kv heads, D] packed keys; [N, heads, D]."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    gqa = q.shape[1] != k.shape[1]
    for row in range(len(starts_q) - 1):
        (q0, q1), (k0, k1) = starts_q[row : row + 2], starts_k[row : row + 2]
        queries = q[q0:q1].transpose(0, 1).unsqueeze(0)
        keys, values = (t[k0:k1].transpose(0, 1).unsqueeze(0) for t in (k, v))
        q_len, k_len = q1 - q0, k1 - k0
        square = causal and q_len == k_len and q_len > 1
        mask = causal_to_last_key(q_len, k_len) if causal and 1 < q_len < k_len else None
        out[q0:q1] = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=square,
                                                    scale=softmax_scale, enable_gqa=gqa)[0].transpose(0, 1)
    return out


@lru_cache(maxsize=4)
def causal_to_last_key(q_len: int, k_len: int) -> torch.Tensor:
    """[q_len, k_len] True where query i (the (k_len - q_len + i)-th key's position) may attend; kept for the
    step's other layers. (torch's ``causal_lower_right`` does this lazily, but importing it imports Triton.)"""
    return torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
