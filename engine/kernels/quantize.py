"""fp32 matrices quantized to GGUF blocks by the native quantizer (``quantize.cpp``): Q4_K as llama.cpp's reference
quantizer makes it without an importance matrix. The ``gguf`` library quantizes the simpler types but not the
K-quants."""

from __future__ import annotations

import numpy as np
import torch

from engine.kernels import native

Q4_K_BLOCK, Q4_K_BYTES = 256, 144


def quantize_q4_k(weight: np.ndarray, isa: str) -> np.ndarray:
    """``weight`` fp32 [rows, columns] (columns a multiple of 256) as Q4_K blocks, uint8 [rows, columns / 256 * 144],
    with ``isa``'s build (every build gives the same bytes)."""
    rows, columns = weight.shape
    if columns % Q4_K_BLOCK:
        raise ValueError(f"Q4_K needs rows of whole 256-value blocks, not {columns}")
    source = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.empty((rows, columns // Q4_K_BLOCK * Q4_K_BYTES), dtype=np.uint8)
    native.library(isa).quantize_q4_k(source.ctypes.data, rows, columns, out.ctypes.data, torch.get_num_threads())
    return out
