"""4-bit weights times a few rows of activations (decode), in Triton: the matrix-vector product that batch-1
decoding spends most of its time in (CUDA; the tests run it on CPU tensors under ``TRITON_INTERPRET=1``).

It reads the same GPTQ packing as ``triton_int4`` (``qweight`` int32 [in / 8, out], scales and offsets [groups,
out]), but without tensor cores: each program loads a [BLOCK_K / 8, BLOCK_N] tile of packed words once, unpacks the
eight nibbles of each word in registers, and accumulates x * (q * scale + offset) in fp32, reducing over the input
axis only at the end (or, ``factored``, sums x * q over each tile and applies the tile's group scale and offset to
that sum: one multiply-add fewer per weight, one reduction per tile). One row per program along the grid's third
axis (rows reread the tile from L2); the input axis may be split over ``split_k`` programs that add into an fp32
output. ``magic`` turns a nibble into a float by OR-ing it into the mantissa of 2^23 instead of an int-to-float
conversion (a quarter-rate instruction on NVIDIA chips).

Which tile sizes win depends on the chip and the matrix, so they come from a table measured on each card by
``bench/int4_gemv_tune.py`` (``int4_gemv_tuned.json`` beside this file, keyed by the device's name and the matrix
shape), with a rule of thumb for cards and shapes it lacks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

TUNED = Path(__file__).with_name("int4_gemv_tuned.json")


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes and launch settings of one product."""

    block_n: int = 128
    block_k: int = 64
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 2
    magic: bool = True
    factored: bool = False

    def fits(self, in_features: int, out_features: int, group_size: int) -> bool:
        """Tiles inside one group, whole tiles along both axes, enough tiles along the input for the split."""
        return (group_size % self.block_k == 0 and in_features % self.block_k == 0
                and out_features % self.block_n == 0 and in_features // self.block_k >= self.split_k)


@dataclass(frozen=True)
class DeviceTable:
    """What ``bench/int4_gemv_tune.py`` measured on one card: the best config per ``"out x in"`` shape, and up to how
    many rows this kernel beats the tensor-core tile kernel."""

    configs: dict[str, GemvConfig]
    max_rows: int


def default_config(in_features: int, out_features: int, group_size: int) -> GemvConfig:
    """Rule of thumb where nothing was measured: the default tiles, the input split in as many parts as give
    about 512 programs."""
    base = GemvConfig()
    block_k = min(base.block_k, group_size)
    block_n = base.block_n if out_features % base.block_n == 0 else 32
    split = 1
    while (out_features // block_n) * split * 2 <= 512 and in_features // block_k >= split * 2:
        split *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split)


@cache
def tuned_tables() -> dict[str, DeviceTable]:
    """The measured tables of every card, by device name."""
    if not TUNED.exists():
        return {}
    raw = json.loads(TUNED.read_text())
    return {name: DeviceTable({shape: GemvConfig(**c) for shape, c in entry["configs"].items()}, entry["max_rows"])
            for name, entry in raw.items()}


def device_table(device: torch.device) -> DeviceTable | None:
    """The table measured on this card, if any (CPU tensors: none)."""
    if device.type != "cuda":
        return None
    return tuned_tables().get(torch.cuda.get_device_name(device))


def config_for(device: torch.device, in_features: int, out_features: int, group_size: int) -> GemvConfig:
    """The measured config of this shape on this card, else the rule of thumb."""
    table = device_table(device)
    tuned = table.configs.get(shape_key(out_features, in_features)) if table else None
    if tuned is not None and tuned.fits(in_features, out_features, group_size):
        return tuned
    return default_config(in_features, out_features, group_size)


def max_rows(device: torch.device) -> int:
    """Up to how many rows products run here (measured per card; 1 where nothing was measured)."""
    table = device_table(device)
    return table.max_rows if table else 1


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def save_table(name: str, configs: dict[str, GemvConfig], rows: int, path: Path = TUNED) -> None:
    """Write (or replace) one card's entry in the table file."""
    raw = json.loads(path.read_text()) if path.exists() else {}
    raw[name] = {"max_rows": rows, "configs": {shape: asdict(c) for shape, c in sorted(configs.items())}}
    path.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    tuned_tables.cache_clear()


@cache
def _kernel() -> Any:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def int4_gemv(x_ptr, qweight_ptr, scales_ptr, offsets_ptr, out_ptr, in_features, stride_xm, stride_qk, stride_sg,
                  stride_om, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr, MAGIC: tl.constexpr, FACTORED: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        words = tl.arange(0, BLOCK_K // 8)
        nibbles = tl.arange(0, 8)
        shifts = (nibbles * 4)[None, :, None]
        acc = tl.zeros((BLOCK_K // 8, 8, BLOCK_N), tl.float32)
        sums = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(pid_k * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
            packed = tl.load(qweight_ptr + (start // 8 + words)[:, None] * stride_qk + offs_n[None, :])
            q = (packed[:, None, :] >> shifts) & 0xF
            if MAGIC:  # noqa: SIM108 (one branch compiled)  the bits of 2^23 + q, read as fp32
                value = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            else:
                value = q.to(tl.float32)
            group = start // GROUP_SIZE
            scale = tl.load(scales_ptr + group * stride_sg + offs_n).to(tl.float32)
            offset = tl.load(offsets_ptr + group * stride_sg + offs_n).to(tl.float32)
            x = tl.load(x_ptr + row * stride_xm + start + words[:, None] * 8 + nibbles[None, :]).to(tl.float32)
            if FACTORED:  # the tile lies in one group: sum_k x q s + x o = s sum_k x q + o sum_k x
                dot = tl.sum(tl.sum(x[:, :, None] * value, axis=1), axis=0)
                sums += dot * scale + tl.sum(tl.sum(x, axis=1), axis=0) * offset
            else:
                acc += x[:, :, None] * (value * scale[None, None, :] + offset[None, None, :])
        total = sums if FACTORED else tl.sum(tl.sum(acc, axis=1), axis=0)
        out = out_ptr + row * stride_om + offs_n
        if SPLIT_K == 1:
            tl.store(out, total.to(out_ptr.dtype.element_ty))
        else:
            tl.atomic_add(out, total)

    return int4_gemv


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
              config: GemvConfig) -> torch.Tensor:
    """``x`` [rows, in] (unit stride in ``in``) times the packed weight: [rows, out] in ``x``'s dtype."""
    rows, in_features = x.shape
    out_features = qweight.shape[1]
    if config.split_k == 1:
        out = x.new_empty((rows, out_features))
    else:
        out = torch.zeros((rows, out_features), dtype=torch.float32, device=x.device)
    grid = (out_features // config.block_n, config.split_k, rows)
    _kernel()[grid](x, qweight, scales, offsets, out, in_features, x.stride(0), qweight.stride(0), scales.stride(0),
                    out.stride(0), GROUP_SIZE=group_size, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                    SPLIT_K=config.split_k, MAGIC=config.magic, FACTORED=config.factored, num_warps=config.num_warps,
                    num_stages=config.num_stages)
    return out if config.split_k == 1 else out.to(x.dtype)
