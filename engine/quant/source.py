"""A checkpoint whose linear layers are stored quantized, served to the model builder as dense weights."""

from __future__ import annotations

import torch

from engine.quant.dequant import as_int4, dequantize, group_order, groups_are_contiguous
from engine.quant.scheme import QuantScheme
from engine.weights.int4 import Int4Weight
from engine.weights.sources import SafetensorsSource

PACKED = ("qweight", "qzeros", "scales", "g_idx")


class QuantizedSource:
    """``X.weight`` of a quantized linear is dequantized from ``X.qweight``/``qzeros``/``scales``/``g_idx`` when
    asked for (one layer at a time, so no second full copy exists), or handed over still 4-bit (``int4``) for the
    packed CPU kernel; every other tensor is read as stored."""

    def __init__(self, inner: SafetensorsSource, scheme: QuantScheme) -> None:
        self.inner, self.scheme = inner, scheme

    def _packed_prefix(self, name: str) -> str | None:
        prefix = name.removesuffix(".weight")
        return prefix if prefix != name and f"{prefix}.qweight" in self.inner else None

    def __contains__(self, name: str) -> bool:
        return name in self.inner or self._packed_prefix(name) is not None

    def _parts(self, prefix: str) -> dict[str, torch.Tensor]:
        return {part: self.inner.dense(f"{prefix}.{part}") for part in PACKED if f"{prefix}.{part}" in self.inner}

    def dense(self, name: str) -> torch.Tensor:
        prefix = self._packed_prefix(name)
        return self.inner.dense(name) if prefix is None else dequantize(self._parts(prefix), self.scheme)

    def dense_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Plain tensors read only their slice; a packed one dequantizes whole, then is cut."""
        if self._packed_prefix(name) is None:
            return self.inner.dense_slice(name, dim, start, stop)
        return self.dense(name).narrow(dim, start, stop - start).clone()

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def stored(self, name: str) -> None:
        return None

    def int4(self, name: str) -> Int4Weight | None:
        """4-bit weights for the packed int4 kernels; act-order layers with their input rows sorted by group (None
        where the groups cannot be made contiguous: read dense)."""
        prefix = self._packed_prefix(name)
        if prefix is None or self.scheme.bits != 4:
            return None
        g_idx = self.inner.dense(f"{prefix}.g_idx") if f"{prefix}.g_idx" in self.inner else None
        if groups_are_contiguous(g_idx, self.scheme.group_size):
            return as_int4(self._parts(prefix), self.scheme)
        assert g_idx is not None
        order = group_order(g_idx, self.scheme.group_size)
        return None if order is None else as_int4(self._parts(prefix), self.scheme, order)
