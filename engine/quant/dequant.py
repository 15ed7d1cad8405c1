"""Unpacking of GPTQ and AWQ int32 words and dequantization to dense ``[out, in]`` fp32 weights (exact)."""

from __future__ import annotations

import torch

from engine.quant.scheme import QuantScheme

# AutoAWQ packs output column 8c + ORDER[k] into nibble k of word c; column 8c + j sits in nibble REVERSE[j].
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack(words: torch.Tensor, bits: int, along: int) -> torch.Tensor:
    """The unsigned ``bits``-wide fields of int32 ``words``, LSB first, laid out along dim ``along`` (0 or 1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, cols, per_word]
    rows, cols, per_word = fields.shape
    if along == 0:
        return fields.permute(0, 2, 1).reshape(rows * per_word, cols)
    return fields.reshape(rows, cols * per_word)


def dequantize_gptq(parts: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]`` (act-order: as stored)."""
    codes = unpack(parts["qweight"], scheme.bits, along=0)  # [in, out]
    zeros = unpack(parts["qzeros"], scheme.bits, along=1)[:, : codes.shape[1]] + scheme.zero_offset  # [groups, out]
    groups = parts.get("g_idx")
    if groups is None:
        groups = torch.arange(codes.shape[0]) // scheme.group_size
    groups = groups.long()
    scales = parts["scales"].float()
    return (scales[groups] * (codes - zeros[groups]).float()).T.contiguous()


def dequantize_awq(parts: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """``W[o, i] = (q[i, o] - zero[i // group, o]) * scales[i // group, o]``, columns de-interleaved."""

    def columns(words: torch.Tensor) -> torch.Tensor:
        fields = unpack(words, 4, along=1)
        rows = fields.shape[0]
        return fields.view(rows, -1, 8)[:, :, AWQ_REVERSE_ORDER].reshape(rows, -1)

    codes, zeros = columns(parts["qweight"]), columns(parts["qzeros"])
    groups = torch.arange(codes.shape[0]) // scheme.group_size
    return ((codes - zeros[groups]).float() * parts["scales"].float()[groups]).T.contiguous()


def dequantize(parts: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    return dequantize_gptq(parts, scheme) if scheme.method == "gptq" else dequantize_awq(parts, scheme)
