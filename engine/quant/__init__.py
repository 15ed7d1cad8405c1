"""Quantized checkpoints (GPTQ 4/8-bit incl. act-order, AWQ GEMM 4-bit), dequantized as they load."""

from engine.quant.scheme import QuantScheme
from engine.quant.source import QuantizedSource

__all__ = ["QuantScheme", "QuantizedSource"]
