"""The CUDA int4 kernels on Qwen-7B-Chat's layer shapes: torch's tinygemm against the Triton kernel, at 1, 16 and
64 rows, in microseconds per layer and achieved bandwidth (4-bit weights read once); and how far apart their
outputs are (same weights, relative difference).

Usage: python bench/int4_kernels.py   (needs a CUDA device)
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from engine.kernels import triton_int4
from engine.weights.int4 import Int4Weight

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (44032, 4096), "down": (4096, 22016)}
GROUP = 128


def main() -> None:
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; group {GROUP}; median of do_bench")
    print(f"{'rows':>4} {'layer':>8} {'tinygemm us':>12} {'triton us':>10} {'tinygemm GB/s':>14} "
          f"{'triton GB/s':>12} {'rel diff':>9}")
    for rows in (1, 16, 64):
        totals = [0.0, 0.0]
        for name, (out_features, in_features) in SHAPES.items():
            q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, device=device)
            scale = torch.rand(out_features, in_features // GROUP, device=device) * 0.02 + 0.001
            weight = Int4Weight(q, scale, -8 * scale, GROUP)
            packed, scales_and_zeros = weight.pack_for_cuda(device)
            qweight, scales, offsets = triton_int4.pack(weight, device, torch.bfloat16)
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            tiny = lambda: torch._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)  # noqa: B023, E731
            tri = lambda: triton_int4.int4_matmul(x, qweight, scales, offsets, GROUP)  # noqa: B023, E731
            difference = ((tiny().float() - tri().float()).norm() / tiny().float().norm()).item()
            times = [do_bench(tiny, return_mode="median") * 1e3, do_bench(tri, return_mode="median") * 1e3]
            nbytes = out_features * in_features / 2
            totals = [t + u for t, u in zip(totals, times, strict=True)]
            print(f"{rows:>4} {name:>8} {times[0]:>12.1f} {times[1]:>10.1f} {nbytes / times[0] / 1e3:>14.0f} "
                  f"{nbytes / times[1] / 1e3:>12.0f} {difference:>9.1e}")
        print(f"{rows:>4} {'layer':>8} {totals[0]:>12.1f} {totals[1]:>10.1f}")


if __name__ == "__main__":
    main()
