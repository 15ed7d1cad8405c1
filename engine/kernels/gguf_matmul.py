"""Matmuls and row lookups over GGUF matrices as the file stores them (``gguf_matmul.cpp``): the weights stay in the
memory-mapped file, in their own blocks (Q4_0, Q4_1, Q8_0, IQ4_NL, Q4_K, Q5_K, Q6_K, IQ4_XS)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from engine.kernels import native

BLOCK_SIZES = {T.Q4_0: 32, T.Q4_1: 32, T.Q8_0: 32, T.IQ4_NL: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256,
               T.IQ4_XS: 256}
# Steps with at least this many rows (prompts) dequantize the weight to bf16 and run torch's GEMM: above it the
# GEMM's throughput pays for writing the weight out once (SmolLM2-1.7B Q4_K_M, Zen 4: 64-row products break even
# against the row kernel) ...
DENSE_ROWS = 64
# ... or, where every matrix of the product runs on the build's many-row kernel (lanes, or the amx build's tiles),
# from this many rows (Xeon 6 model 167, 16384 x 2048 Q4_K, bf16 GEMM on oneDNN's AMX path: 256 rows take 33 / 25 ms
# on avx512's lanes / the tiles against 35 / 34 dense, 384 rows 50 / 37 against 46 / 39, 768 rows 115 / 80 against
# 51 / 55). The avx2 build never takes the dense path: it is what CPUs without AVX512 run, whose bf16 GEMM is ten
# times slower than the lanes (oneDNN held to AVX2 there: 560 rows in 1.2 s against 0.11 s).
MANY_ROW_DENSE_ROWS = 384
LANE_TYPES = frozenset({T.Q4_K, T.Q5_K, T.Q6_K})  # and Q8_0 over whole super-blocks of inputs (on_lanes)
# The amx build computes steps of at least this many rows on AMX tiles (the matrices ``on_lanes`` takes), fewer on
# the lanes or the row kernel (Xeon 6 model 167, 16384 x 2048 from memory, tiles / avx512's lanes, ms: Q4_K 12 rows
# 2.00 / 2.00, 16 rows 2.03 / 2.26, 24 rows 3.38 / 3.07; Q8_0 12 rows 3.25 / 3.21, 16 rows 3.35 / 3.49; Q6_K 12 rows
# 3.36 / 3.08, 16 rows 3.38 / 3.71: tiles take 16 rows at a time, so they win at 16 and 32, the lanes in between).
TILE_ROWS = 12
# The vector builds compute steps of at least this many rows of Q4_K, Q5_K, Q6_K and Q8_0 (``on_lanes``) on lanes
# (16 weight rows side by side, a super-block decoded once for all the step's rows), fewer on the row kernel (Xeon 6
# model 167, 16384 x 2048 from memory, avx2 / avx512 builds, ms: Q4_K at 4 rows 1.73 / 1.63 against 2.05 / 1.64, at
# 16 rows 4.0 / 2.5 against 7.5 / 5.6; Q6_K's larger decode costs more below 8 rows on avx512, at 4 rows 2.38 / 2.32
# against 2.38 / 2.09, at 8 rows 3.00 / 2.69 against 3.93 / 2.91; Q8_0 at 4 rows 2.92 / 2.41 against 2.91 / 2.61, at
# 16 rows 6.2 / 3.3 against 11.6 / 8.2).
LANE_ROWS = 4


@dataclass(frozen=True)
class StoredMatrix:
    """A matrix as a GGUF file holds it: ``blocks`` uint8 [out, bytes per row] (a view of the mapped file, never
    copied) of GGML type ``type`` over ``in_features`` inputs."""

    blocks: np.ndarray
    type: T
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]


def dense_rows(matrices: list[StoredMatrix], isa: str) -> int | None:
    """The rows from which a bf16 product of ``matrices`` on build ``isa`` runs on the dequantized weight (None:
    never)."""
    if isa == "avx2":
        return None
    return MANY_ROW_DENSE_ROWS if all(map(on_lanes, matrices)) else DENSE_ROWS


def on_lanes(matrix: StoredMatrix) -> bool:
    """Whether steps of ``LANE_ROWS`` rows or more of ``matrix`` run on the vector builds' lanes (the same matrices
    as the amx build's tiles take)."""
    return matrix.type in LANE_TYPES or (matrix.type == T.Q8_0 and matrix.in_features % 256 == 0)


def fits(matrix: StoredMatrix) -> bool:
    """Whether the kernels compute with this type (a file's rows are whole blocks)."""
    block = BLOCK_SIZES.get(matrix.type)
    return block is not None and matrix.in_features % block == 0


class _Matrix(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("type", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("column", ctypes.c_int64), ("index", ctypes.c_void_p)]


class GGUFMatmul(native.RowKernel):
    """``y = norm?(x) @ W^T (+ bias)`` for rows ``x`` [M, in] -> [M, out] over ``matrices`` stacked along the outputs
    (fused q/k/v or gate/up; their types may differ). ``columns``: per matrix, None (its outputs in order) or where
    each of its rows goes among the outputs. ``dtype``: the activations' (bf16, or fp32 for an fp32 model);
    ``out_dtype``: the result's."""

    def __init__(self, matrices: list[StoredMatrix], columns: list[torch.Tensor | None], bias: torch.Tensor | None,
                 isa: str, dtype: torch.dtype = torch.bfloat16, out_dtype: torch.dtype | None = None) -> None:
        out_dtype = out_dtype or dtype
        assert {dtype, out_dtype} <= {torch.bfloat16, torch.float32}, "the kernel reads and writes bf16 or fp32"
        k = matrices[0].in_features
        assert all(m.in_features == k and fits(m) for m in matrices)
        self.columns = [None if c is None else c.to(torch.int32).contiguous() for c in columns]
        self.bias = None if bias is None else bias.float().contiguous()
        self.matrices = matrices  # the views the pointers below point into
        table, start = [], 0
        for matrix, column in zip(matrices, self.columns, strict=True):
            assert matrix.blocks.flags.c_contiguous
            table.append(_Matrix(matrix.blocks.ctypes.data, int(matrix.type), matrix.out_features, start,
                                 None if column is None else column.data_ptr()))
            start += matrix.out_features
        self.table = (_Matrix * len(table))(*table)
        self._isa = isa
        self.dense_rows = dense_rows(matrices, isa)
        super().__init__(native.library(isa).gguf_linear,
                         (ctypes.addressof(self.table), len(table), start, k, int(dtype == torch.float32),
                          None if self.bias is None else self.bias.data_ptr(), int(out_dtype == torch.float32),
                          TILE_ROWS, LANE_ROWS),
                         start, dtype, out_dtype, fusable=True)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense_rows is None or x.shape[0] < self.dense_rows or self.in_dtype != torch.bfloat16:
            return super().__call__(x, residual)
        y = self.dense(x)
        return y if residual is None else residual.add_(y)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The same product on the bf16-dequantized weight and torch's GEMM (many rows)."""
        if self.norm is not None:  # the kernel's fused RMSNorm, in fp32
            eps = self._norm_args[1]
            values = x.float()
            x = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps) * self.norm
        if self.gated:  # the kernel's SwiGLU activation, in fp32
            gate, up = x.float().chunk(2, dim=-1)
            x = torch.nn.functional.silu(gate) * up
        y = torch.nn.functional.linear(x.to(torch.bfloat16), self.dense_weight(), None)
        return (y if self.bias is None else y.float() + self.bias).to(self.out_dtype)

    def dense_weight(self) -> torch.Tensor:
        """The stacked weight dequantized to bf16 [out, in], each row at its output column."""
        lib = native.library(self._isa)
        out = torch.empty((self.out_features, self.matrices[0].in_features), dtype=torch.bfloat16)
        for matrix, entry in zip(self.matrices, self.table, strict=True):
            target = out if entry.index else out[entry.column : entry.column + matrix.out_features]
            lib.gguf_dequantize(matrix.blocks.ctypes.data, int(matrix.type), matrix.in_features, matrix.out_features,
                                entry.index, target.data_ptr(), self._threads)
        return out


def rows(matrix: StoredMatrix, ids: torch.Tensor, isa: str) -> torch.Tensor:
    """Rows ``ids`` of ``matrix`` dequantized to fp32 [len(ids), in] (an embedding lookup)."""
    ids = ids.to(torch.int64).contiguous()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < matrix.out_features:
        raise IndexError("row id out of range")
    out = torch.empty((ids.numel(), matrix.in_features), dtype=torch.float32)
    native.library(isa).gguf_rows(matrix.blocks.ctypes.data, int(matrix.type), matrix.in_features, ids.data_ptr(),
                                  ids.numel(), out.data_ptr())
    return out
