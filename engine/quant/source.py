"""A checkpoint whose linear layers are stored quantized, served to the model builder as dense weights."""

from __future__ import annotations

import torch

from engine.quant.dequant import dequantize
from engine.quant.scheme import QuantScheme
from engine.weights.int4 import Int4Weight
from engine.weights.sources import SafetensorsSource

PACKED = ("qweight", "qzeros", "scales", "g_idx")


class QuantizedSource:
    """``X.weight`` of a quantized linear is dequantized from ``X.qweight``/``qzeros``/``scales``/``g_idx`` when
    asked for (one layer at a time, so no second full copy exists); every other tensor is read as stored."""

    def __init__(self, inner: SafetensorsSource, scheme: QuantScheme) -> None:
        self.inner, self.scheme = inner, scheme

    def _packed_prefix(self, name: str) -> str | None:
        prefix = name.removesuffix(".weight")
        return prefix if prefix != name and f"{prefix}.qweight" in self.inner else None

    def __contains__(self, name: str) -> bool:
        return name in self.inner or self._packed_prefix(name) is not None

    def dense(self, name: str) -> torch.Tensor:
        prefix = self._packed_prefix(name)
        if prefix is None:
            return self.inner.dense(name)
        parts = {part: self.inner.dense(f"{prefix}.{part}") for part in PACKED if f"{prefix}.{part}" in self.inner}
        return dequantize(parts, self.scheme)

    def int4(self, name: str) -> Int4Weight | None:
        return None
