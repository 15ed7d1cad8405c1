"""4-bit weights kept packed: the asymmetric form w = q * scale + zero, per group of input features."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CUDA_INT4 = "tinygemm"  # the int4_kernel name of torch's CUDA int4 weight-only kernel
TRITON_INT4 = "triton"  # ... and of the Triton kernel (engine/kernels/triton_int4.py)
CUDA_INT4_KERNELS = ("auto", CUDA_INT4, TRITON_INT4)  # what a user may ask for on CUDA
CUDA_GROUP_SIZES = (32, 64, 128, 256)
CUDA_INNER_K_TILES = 8  # tinygemm's tiling of the input axis: inputs must be a multiple of 16 times this


@dataclass
class Int4Weight:
    """``q``: uint8 [out, in] in 0..15; ``scale``/``zero``: fp32 [out, in // group_size]. ``input_order``: None, or
    the inputs in the order ``q``'s columns hold them (GPTQ act-order, sorted by group at load): column j is input
    ``input_order[j]``, so the layer computes x[..., input_order] times this weight."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    input_order: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def dequantize(self) -> torch.Tensor:
        groups = self.q.view(self.q.shape[0], -1, self.group_size).float()
        return (groups * self.scale[..., None] + self.zero[..., None]).view(self.q.shape)

    def rows(self, index: torch.Tensor) -> Int4Weight:
        return Int4Weight(self.q[index], self.scale[index], self.zero[index], self.group_size, self.input_order)

    @staticmethod
    def stackable(parts: list[Int4Weight]) -> bool:
        """Whether the parts read their inputs in one order, so that one fused product serves them all."""
        first = parts[0].input_order
        return all(p.input_order is first
                   or (p.input_order is not None and first is not None and torch.equal(p.input_order, first))
                   for p in parts)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Stack along the output axis (fusing q/k/v or gate/up; the parts must be ``stackable``)."""
        return Int4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            parts[0].group_size,
            parts[0].input_order,
        )

    def pack_for_cpu(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, scales-and-zeros) for ``torch._weight_int4pack_mm_for_cpu``: w = (q - 8) s + z."""
        packed = torch._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), 1)
        return packed, self._scales_and_zeros(dtype)

    def fits_cuda(self) -> bool:
        """The shapes torch's CUDA int4 kernel (tinygemm) takes."""
        out_features, in_features = self.q.shape
        return (self.group_size in CUDA_GROUP_SIZES and in_features % (16 * CUDA_INNER_K_TILES) == 0
                and out_features % 8 == 0)

    def pack_for_cuda(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, bf16 scales-and-zeros) for ``torch._weight_int4pack_mm`` on ``device``: two 4-bit values
        per byte, the even input feature in the high nibble, then tinygemm's tiled layout."""
        q = self.q.to(device)
        pairs = q[:, ::2] * 16 + q[:, 1::2]  # uint8 throughout: at most 255
        packed = torch._convert_weight_to_int4pack(pairs, CUDA_INNER_K_TILES)
        return packed, self._scales_and_zeros(torch.bfloat16).to(device)

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """[groups, out, 2]: each group's scale and the offset that makes w = (q - 8) * scale + offset."""
        scales_and_zeros = torch.stack([self.scale, self.zero + 8 * self.scale], dim=-1).transpose(0, 1)
        return scales_and_zeros.contiguous().to(dtype)
