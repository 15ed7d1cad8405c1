"""Quantizing a dense checkpoint while it loads (``--quantization``): its layers' matrices become GGUF blocks in
memory, rounded to nearest as llama.cpp's ``llama-quantize`` does without an importance matrix (the ``gguf``
library's quantizer, which gives the same bytes for Q8_0 and Q4_0; the native one for Q4_K, whose rows must be whole
256-value super-blocks: other matrices fall back to Q8_0, as llama-quantize falls back to a type they fit), and run
on the native kernels as a GGUF file's would."""

from __future__ import annotations

import logging

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from engine.kernels import native
from engine.kernels.gguf_matmul import StoredMatrix
from engine.kernels.quantize import Q4_K_BLOCK, quantize_q4_k
from engine.weights.gguf_tensors import int4_from_blocks
from engine.weights.int4 import Int4Weight
from engine.weights.sources import WeightSource

TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q4_k": GGMLQuantizationType.Q4_K}
log = logging.getLogger(__name__)


class QuantizingSource:
    """``inner``'s layer matrices (every 2-D tensor but ``keep``: the embedding and LM head) quantized to ``kind`` as
    the builder asks for them, one at a time; 4-bit ones also as ``Int4Weight`` for the repacked 4-bit kernel."""

    def __init__(self, inner: WeightSource, kind: str, keep: set[str]) -> None:
        self.inner, self.type, self.keep = inner, TYPES[kind], keep
        self.fallback_logged = False  # Q4_K: the log line naming the first matrix quantized to Q8_0 instead

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def dense(self, name: str) -> torch.Tensor:
        return self.inner.dense(name)

    def dense_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.inner.dense_slice(name, dim, start, stop)

    def int8(self, name: str) -> None:
        return None

    def stored(self, name: str) -> StoredMatrix | None:
        if name in self.keep or not name.endswith(".weight"):
            return None
        weight = self.inner.dense(name)
        if weight.dim() != 2 or weight.shape[1] % 32:
            return None
        values = np.ascontiguousarray(weight.float().numpy())
        if self.type == GGMLQuantizationType.Q4_K:
            if weight.shape[1] % Q4_K_BLOCK == 0:
                return StoredMatrix(quantize_q4_k(values, native.isas()[0]), self.type, weight.shape[1])
            if not self.fallback_logged:
                log.info("q4_k: matrices whose rows are not whole 256-value blocks are quantized to q8_0 instead "
                         "(the first: %s, %d columns)", name, weight.shape[1])
                self.fallback_logged = True
            return StoredMatrix(quantize(values, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0,
                                weight.shape[1])
        return StoredMatrix(quantize(values, self.type), self.type, weight.shape[1])

    def int4(self, name: str) -> Int4Weight | None:
        if self.type != GGMLQuantizationType.Q4_0 or (stored := self.stored(name)) is None:
            return None
        return int4_from_blocks(stored.blocks, stored.type, stored.out_features, stored.in_features)
