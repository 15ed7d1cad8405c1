"""Tensors of a GGUF file (memory-mapped by the ``gguf`` library's reader): as stored, for the native kernels that
compute on GGUF blocks; dense ones dequantized with the ``gguf`` library; Q4_0/Q4_1 as 4-bit, Q8_0 as 8-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine.kernels.gguf_matmul import StoredMatrix
from engine.weights.int4 import Int4Weight
from tokenizer.gguf_metadata import MappedReader

_BLOCK = 32  # inputs per block of Q4_0, Q4_1 and Q8_0
_Q4_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}


class GGUFTensors:
    """Named access to the tensors of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.reader = MappedReader(str(path))
        self._tensors = {t.name: t for t in self.reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def is_int4(self, name: str) -> bool:
        return self._tensors[name].tensor_type in _Q4_BYTES

    def stored(self, name: str) -> StoredMatrix | None:
        """A quantized matrix as the file stores it (a view of the mapped file, nothing read yet); a stack of experts
        [E, out, in] as its E * out rows; None for dense tensors."""
        tensor = self._tensors[name]
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            return None
        if len(tensor.shape) not in (2, 3):
            return None
        in_features = int(tensor.shape[0])
        rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
        return StoredMatrix(np.asarray(tensor.data).reshape(rows, -1), tensor.tensor_type, in_features)

    def dense(self, name: str) -> torch.Tensor:
        """The tensor as fp32, in PyTorch layout ([out, in] for matrices)."""
        tensor = self._tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        return torch.from_numpy(np.array(values, dtype=np.float32))

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A Q8_0 matrix without dequantizing: int8 values [out, in] and fp32 scales [out, in / 32]; None for
        other types."""
        tensor = self._tensors[name]
        if tensor.tensor_type != GGMLQuantizationType.Q8_0:
            return None
        out_features, in_features = (int(d) for d in reversed(tensor.shape))
        blocks = np.asarray(tensor.data).reshape(out_features, in_features // _BLOCK, -1)
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).reshape(out_features, in_features)
        return torch.from_numpy(q), torch.from_numpy(scale)

    def int4(self, name: str) -> Int4Weight:
        """A Q4_0/Q4_1 matrix without dequantizing: the same numbers ``dense`` would give, kept packed."""
        tensor = self._tensors[name]
        out_features, in_features = (int(d) for d in reversed(tensor.shape))
        return int4_from_blocks(np.asarray(tensor.data), tensor.tensor_type, out_features, in_features)


def int4_from_blocks(data: np.ndarray, kind: GGMLQuantizationType, out_features: int, in_features: int) -> Int4Weight:
    """Q4_0/Q4_1 blocks as ``Int4Weight``: codes, and per block of 32 the scale and offset (Q4_0: -8 x scale)."""
    blocks = data.reshape(out_features, in_features // _BLOCK, -1)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == GGMLQuantizationType.Q4_1:
        zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4:]
    else:
        zero = -8.0 * scale
        packed = blocks[..., 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(out_features, in_features)
    return Int4Weight(torch.from_numpy(q.copy()), torch.from_numpy(scale), torch.from_numpy(zero), _BLOCK)
