"""Unpacking of GPTQ and AWQ int32 words and dequantization to dense ``[out, in]`` fp32 weights (exact)."""

from __future__ import annotations

import torch

from engine.quant.scheme import QuantScheme
from engine.weights.int4 import Int4Weight

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


def codes_zeros_groups(parts: dict[str, torch.Tensor], scheme: QuantScheme
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [in, out], zero points [groups, out] and the group of every input row, of either format."""
    if scheme.method == "gptq":
        codes = unpack(parts["qweight"], scheme.bits, along=0)
        zeros = unpack(parts["qzeros"], scheme.bits, along=1)[:, : codes.shape[1]] + scheme.zero_offset
        groups = parts.get("g_idx")
        if groups is None:
            groups = torch.arange(codes.shape[0]) // scheme.group_size
        return codes, zeros, groups.long()
    codes, zeros = _awq_columns(parts["qweight"]), _awq_columns(parts["qzeros"])
    return codes, zeros, torch.arange(codes.shape[0]) // scheme.group_size


def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    fields = unpack(words, 4, along=1)
    rows = fields.shape[0]
    return fields.view(rows, -1, 8)[:, :, AWQ_REVERSE_ORDER].reshape(rows, -1)


def dequantize(parts: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g`` the group of input row ``i`` (GPTQ
    act-order: ``g_idx`` as stored; AWQ: columns de-interleaved)."""
    codes, zeros, groups = codes_zeros_groups(parts, scheme)
    return (parts["scales"].float()[groups] * (codes - zeros[groups]).float()).T.contiguous()


def groups_are_contiguous(g_idx: torch.Tensor | None, group_size: int) -> bool:
    """Whether input row i lies in group i // group_size (always so without ``g_idx``; not under act-order)."""
    return g_idx is None or torch.equal(g_idx.long(), torch.arange(len(g_idx)) // group_size)


def group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """GPTQ act-order: the input rows sorted by group (stable), when that makes every group ``group_size``
    consecutive rows, as GPTQ's act-order writes them; else None."""
    order = torch.argsort(g_idx.long(), stable=True)
    contiguous = torch.arange(len(g_idx)) // group_size
    return order if torch.equal(g_idx.long()[order], contiguous) else None


def as_int4(parts: dict[str, torch.Tensor], scheme: QuantScheme, order: torch.Tensor | None = None) -> Int4Weight:
    """A 4-bit weight as ``Int4Weight``: w = q * scale + zero per group of inputs. ``order``: the input rows in the
    order that makes the groups contiguous (act-order, from ``group_order``), kept with the weight."""
    codes, zeros, _ = codes_zeros_groups(parts, scheme)
    if order is not None:
        codes = codes[order]
    scales = parts["scales"].float()
    return Int4Weight(codes.T.to(torch.uint8).contiguous(), scales.T.contiguous(),
                      (-zeros.float() * scales).T.contiguous(), scheme.group_size, order)
