"""Building blocks of the decoder: RMSNorm, dense and int4 linears, rotary embedding."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from engine.kernels import gguf_matmul, triton_int4, triton_int4_gemv, triton_norm
from engine.kernels.gguf_matmul import GGUFMatmul, StoredMatrix
from engine.kernels.native import RowKernel
from engine.kernels.q4q8 import PackedQ4, Q4Q8Matmul
from engine.kernels.q8head import Q8Matmul


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in one fused op (accumulating in fp32); on the Triton kernel when
    ``triton`` is set (CUDA)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton:
            return triton_norm.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class DenseLinear(nn.Module):
    """y = x W^T + b with a full-precision weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class Int4Linear(nn.Module):
    """Weight-only int4 linear on torch's packed kernel: w = (q - 8) * scale + zero, per group of inputs."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group_size = group_size
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)


class CudaInt4Linear(Int4Linear):
    """The same weight-only int4 linear on torch's CUDA kernel (tinygemm: bf16 activations, sm80+), weights kept at
    4 bits in its tiled layout."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)


class TritonInt4Linear(nn.Module):
    """Weight-only int4 linear on the Triton kernels: GPTQ's packing, bf16/fp16 activations; a matrix-vector
    kernel up to the rows it wins at on this card (``kernels/triton_int4_gemv``, tile sizes measured per card),
    the tensor-core tile kernel (``kernels/triton_int4``) beyond."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group_size = group_size
        in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
        self.gemv = triton_int4_gemv.config_for(qweight.device, in_features, out_features, group_size)
        fits = self.gemv.fits(in_features, out_features, group_size)
        self.gemv_rows = triton_int4_gemv.max_rows(qweight.device) if fits else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()
        if rows.shape[0] <= self.gemv_rows:
            y = triton_int4_gemv.int4_gemv(rows, self.qweight, self.scales, self.offsets, self.group_size, self.gemv)
        else:
            y = triton_int4.int4_matmul(rows, self.qweight, self.scales, self.offsets, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class ReorderedInputs(nn.Module):
    """A linear whose 4-bit weight holds its inputs in another order (GPTQ act-order, its groups made contiguous at
    load): the inputs are gathered into that order first, one small copy of the activations."""

    def __init__(self, order: torch.Tensor, linear: nn.Module) -> None:
        super().__init__()
        self.register_buffer("order", order)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.order))


class NativeLinear(nn.Module):
    """A linear on a native CPU kernel (``matmul``), which can apply the preceding RMSNorm itself."""

    matmul: RowKernel

    def fuse_norm(self, norm: RMSNorm) -> None:
        """Apply ``norm`` inside the kernel (the caller then drops its own)."""
        self.matmul.fuse_norm(norm.weight, norm.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [tokens, in] (the model's packed rows; [tokens, 2 in] after ``fuse_swiglu``); with ``residual``
        (a fusable kernel), the result added to it in place."""
        return self.matmul(x, residual)

    def fuse_swiglu(self) -> None:
        """Take an MLP's gate/up output and apply its activation inside the kernel (a down projection)."""
        self.matmul.fuse_swiglu()


class Q4Q8Linear(NativeLinear):
    """int4 weights times int8 activations quantized per block of 16 (llama.cpp's Q4_1 x Q8_1 product, with finer
    blocks) on the native kernel built for ``isa``: on AVX512-VNNI 2-2.7x faster than torch's weight-only kernel from
    16 rows."""

    def __init__(self, weight: PackedQ4, bias: torch.Tensor | None, *, isa: str,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.matmul = Q4Q8Matmul(weight, bias, isa, dtype)


class Q8Linear(NativeLinear):
    """An LM head on Q8_0 weights (GGUF's 8-bit embedding table) with 16-bit activations, fp32 out, on the native
    kernel: half the bytes of an fp16 head and the stored values exactly."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, *, isa: str) -> None:
        super().__init__()
        self.matmul = Q8Matmul(q, scale, isa)
        self.register_buffer("q", self.matmul.q)
        self.register_buffer("scale", self.matmul.scale)


class StoredLinear(NativeLinear):
    """A linear over GGUF matrices used in place from the mapped file (fused parts stacked along the outputs, each in
    its own type), on the native kernel built for ``isa``; ``out_dtype`` fp32 for an LM head."""

    def __init__(self, matrices: list[StoredMatrix], columns: list[torch.Tensor | None], bias: torch.Tensor | None,
                 *, isa: str, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.matmul = GGUFMatmul(matrices, columns, bias, isa, dtype, out_dtype)


def fuses(linear: nn.Module) -> bool:
    """Whether ``linear``'s native kernel applies SwiGLU and adds into a residual itself."""
    return isinstance(linear, NativeLinear) and linear.matmul.fusable


def project(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``linear(x)``, added to ``residual`` when given: in place, inside the kernel, where it ``fuses``."""
    if residual is None:
        return linear(x)
    if fuses(linear):
        return linear(x, residual)
    return residual + linear(x)


class StoredRows(nn.Module):
    """An embedding table used in place from the mapped GGUF file: the rows a step looks up are dequantized, in fp32
    (the caller rounds them once, to the layers' dtype). ``dtype``: the precision of the model's head."""

    def __init__(self, matrix: StoredMatrix, isa: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.matrix, self.isa, self.dtype = matrix, isa, dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return gguf_matmul.rows(self.matrix, token_ids, self.isa)


def qwen_ntk_alpha(prompt_len: int, seq_length: int) -> float:
    """Qwen-1 dynamic-NTK alpha, fixed for a sequence by the length of its first (prefill) pass."""
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def inverse_frequencies(head_dim: int, base: float, ntk_alpha: float = 1.0) -> torch.Tensor:
    """RoPE inverse frequencies (fp32); with NTK scaling the base becomes base * alpha^(d/(d-2))."""
    if ntk_alpha != 1.0:
        base = base * ntk_alpha ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. ``x``: [N, heads, D]; ``cos``: [N, 1, D] (both halves); ``sin``: [N, 1, D] with the
    first half negated, so that rotate_half(x) * sin becomes a swap of halves times ``sin``. Factors narrower
    than the head (partial rotary) rotate its first dimensions and leave the rest as they are."""
    rotated = cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)
