"""What one decode step costs the device: kernel launches, host<->device copies and host syncs per step, for
Qwen-7B-Chat's shapes with random weights (fewer layers for a quick run), from torch's profiler.

Usage: python bench/step_profile.py --device cuda [--layers 4] [--batch 1] [--weights dense|int4]
       [--int4-kernel tinygemm|triton]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from random_model import random_qwen_7b

from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.device import select_device, select_dtype
from engine.weights.loader import int4_kernel_for

STEPS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--weights", choices=["dense", "int4"], default="dense")
    parser.add_argument("--int4-kernel", choices=["tinygemm", "triton"], help="--weights int4: this kernel")
    args = parser.parse_args()
    device = select_device(args.device)
    dtype = select_dtype(None, device)
    kernel = (args.int4_kernel or int4_kernel_for(device, dtype)) if args.weights == "int4" else None
    loaded = random_qwen_7b(device, dtype, args.layers, int4_kernel=kernel)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=2048, kv_cache_memory=2 << 30,
                                            scheduler=SchedulerConfig(max_num_seqs=max(args.batch, 1))))
    params = SamplingParams(temperature=0, max_tokens=4 * STEPS, ignore_eos=True)
    for index in range(args.batch):
        engine.add_request(str(index), list(range(100 + index, 228 + index)), params)
    for _ in range(4):  # prefill and warm-up decode steps
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(STEPS):
            engine.step()
    events = profile.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    runtime = Counter(e.name for e in events if e.name.startswith(("cuda", "cudaLaunch")))
    ops = Counter(e.name for e in events if e.name.startswith("aten::"))
    print(f"{args.layers} layers, batch {args.batch}, {args.weights} ({kernel}), {dtype}, per decode step:")
    print(f"  device kernels/copies: {len(kernels) / STEPS:.0f}")
    for name, count in runtime.most_common(12):
        print(f"  {name}: {count / STEPS:.1f}")
    print("  most frequent aten ops:", ", ".join(f"{n} {c / STEPS:.0f}" for n, c in ops.most_common(15)))
    print(profile.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                       else "self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
