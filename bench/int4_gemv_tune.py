"""Measure the int4 matrix-vector kernel's tile sizes on this card and write the winners into
``engine/kernels/int4_gemv_tuned.json`` (the table ``TritonInt4Linear`` reads), for Qwen-7B-Chat's layer shapes
(and Qwen2-7B's with ``--more``); then up to how many rows it beats the tensor-core tile kernel. Each product is
timed as a replayed CUDA graph (as decode steps run), the fp32 zeroing and the cast of split products included,
cycling through copies of the weight that together exceed the L2 cache twice (as successive layers do); tinygemm's
time is printed beside it.

Usage: python bench/int4_gemv_tune.py [--out FILE] [--more]   (needs a CUDA device)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from engine.kernels import triton_int4
from engine.kernels.triton_int4_gemv import TUNED, GemvConfig, int4_gemv, save_table, shape_key
from engine.weights.int4 import Int4Weight

SHAPES = {  # (out, in) of the fused layers
    "qwen-7b qkv": (12288, 4096), "qwen-7b o_proj": (4096, 4096), "qwen-7b gate_up": (22016, 4096),
    "qwen-7b down": (4096, 11008),
}
MORE_SHAPES = {"qwen2-7b qkv": (4608, 3584), "qwen2-7b o_proj": (3584, 3584), "qwen2-7b gate_up": (37888, 3584),
               "qwen2-7b down": (3584, 18944)}
GROUP = 128
TILES = [(n, k, s) for n, k, s in itertools.product((64, 128, 256, 512), (32, 64, 128), (1, 4, 8, 16, 32))
         if n * k <= 32768]
LAUNCH = list(itertools.product((2, 4, 8), (1, 3), (True, False), (True, False)))  # warps, stages, magic, factored
FLUSH_BYTES = 256 << 20  # weight copies cycled through: over twice an H200's 60 MB of L2


def timed(calls: list[Callable[[], object]]) -> float:
    """Microseconds per call: ``calls`` (one per weight copy) captured in a CUDA graph, best of 3 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compiles, and warms the allocator outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / len(calls))
    return best


@dataclass
class Operands:
    """Copies of one random 4-bit weight (GPTQ packing and tinygemm's) and an input of ``rows`` rows."""

    x: torch.Tensor
    triton: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    tinygemm: list[tuple[torch.Tensor, torch.Tensor]]


def operands(out_features: int, in_features: int, rows: int, device: torch.device) -> Operands:
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, device=device)
    scale = torch.rand(out_features, in_features // GROUP, device=device) * 0.02 + 0.001
    weight = Int4Weight(q, scale, -8 * scale, GROUP)
    copies = max(4, -(-FLUSH_BYTES // (out_features * in_features // 2)))
    packed = triton_int4.pack(weight, device, torch.bfloat16)
    tiny = weight.pack_for_cuda(device)
    return Operands(torch.randn(rows, in_features, device=device, dtype=torch.bfloat16),
                    [tuple(t.clone() for t in packed) for _ in range(copies)],
                    [tuple(t.clone() for t in tiny) for _ in range(copies)])


def gemv_time(ops: Operands, config: GemvConfig) -> float:
    return timed([partial(int4_gemv, ops.x, *w, GROUP, config) for w in ops.triton])


def best_config(out_features: int, in_features: int, device: torch.device) -> tuple[GemvConfig, float, float]:
    """(best config, its microseconds, tinygemm's) at one row."""
    ops = operands(out_features, in_features, 1, device)
    tinygemm = timed([partial(torch._weight_int4pack_mm, ops.x, w[0], GROUP, w[1]) for w in ops.tinygemm])
    tiles = [GemvConfig(block_n=n, block_k=k, split_k=s) for n, k, s in TILES]
    ranked = sorted(((gemv_time(ops, c), c) for c in tiles if c.fits(in_features, out_features, GROUP)),
                    key=lambda pair: pair[0])
    finalists = [replace(c, num_warps=w, num_stages=st, magic=m, factored=f) for _, c in ranked[:2]
                 for w, st, m, f in LAUNCH]
    best_us, best = min(((gemv_time(ops, c), c) for c in finalists), key=lambda pair: pair[0])
    return best, best_us, tinygemm


def rows_won(configs: dict[str, GemvConfig], device: torch.device) -> int:
    """Up to how many rows (1, 2, 4, 8) the matrix-vector kernel, summed over the shapes, beats the tile kernel."""
    won = 1
    for rows in (2, 4, 8):
        gemv = tile = 0.0
        for out_features, in_features in SHAPES.values():
            ops = operands(out_features, in_features, rows, device)
            gemv += gemv_time(ops, configs[shape_key(out_features, in_features)])
            tile += timed([partial(triton_int4.int4_matmul, ops.x, *w, GROUP) for w in ops.triton])
        print(f"{rows} rows: matrix-vector {gemv:.1f} us, tile kernel {tile:.1f} us (all shapes)")
        if gemv >= tile:
            break
        won = rows
    return won


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TUNED, help="the table to write this card's entry into")
    parser.add_argument("--more", action="store_true", help="Qwen2-7B's shapes too")
    args = parser.parse_args()
    if args.more:
        SHAPES.update(MORE_SHAPES)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    print(f"{name}; group {GROUP}; microseconds per product at one row, replayed CUDA graphs")
    configs = {}
    for label, (out_features, in_features) in SHAPES.items():
        config, us, tinygemm = best_config(out_features, in_features, device)
        configs[shape_key(out_features, in_features)] = config
        gbps = out_features * in_features / 2 / us / 1e3
        print(f"{label:>16}: {us:7.1f} us ({gbps:5.0f} GB/s of 4-bit weights), tinygemm {tinygemm:7.1f} us; {config}")
    save_table(name, configs, rows_won(configs, device), args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
