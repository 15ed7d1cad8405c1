"""Tensor parallelism on this host's CPU: decode tokens/s and the time rank 0 spends in all-reduces per step, at 1
and 2 ranks (gloo), on random weights with Qwen2-0.5B's shapes written once as a checkpoint; and each rank's peak
RSS after loading. On a 2-core machine expect no speed-up (the ranks share the cores): the point is the path.
Usage: .venv/bin/python bench/tp_speed.py [--layers 24] [--tokens 64] [--batch 1 8]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from servers import cpu_model

from engine import EngineConfig, LLMEngine, SamplingParams
from engine import parallel as parallel_module

QWEN2_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
             "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
             "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True}


def write_checkpoint(folder: Path, layers: int) -> Path:
    config = {**QWEN2_05B, "num_hidden_layers": layers}
    h, inner, heads, kv = config["hidden_size"], config["intermediate_size"], 14, 2
    d = h // heads
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5

    tensors = {"model.embed_tokens.weight": randn(config["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                    p + "self_attn.q_proj.weight": randn(heads * d, h), p + "self_attn.q_proj.bias": randn(heads * d),
                    p + "self_attn.k_proj.weight": randn(kv * d, h), p + "self_attn.k_proj.bias": randn(kv * d),
                    p + "self_attn.v_proj.weight": randn(kv * d, h), p + "self_attn.v_proj.bias": randn(kv * d),
                    p + "self_attn.o_proj.weight": randn(h, heads * d), p + "mlp.gate_proj.weight": randn(inner, h),
                    p + "mlp.up_proj.weight": randn(inner, h), p + "mlp.down_proj.weight": randn(h, inner)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class ReduceTimer:
    """Wall time rank 0 spends inside all-reduces (the row-parallel outputs and the embedding)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._reduce = dist.all_reduce

    def __enter__(self) -> ReduceTimer:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._reduce(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        parallel_module.dist.all_reduce = timed
        return self

    def __exit__(self, *exc: object) -> None:
        parallel_module.dist.all_reduce = self._reduce


def peak_rss_mib(pid: int) -> float:
    """The process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from before an exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_rate(engine: LLMEngine, batch: int, tokens: int) -> tuple[float, int]:
    """Tokens/s of ``batch`` requests decoding ``tokens`` each (prefill excluded), and the steps taken."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [100 + i, 200, 300, 400], params)
    engine.step()  # the prefill
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return batch * (tokens - 1) / (time.perf_counter() - start), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ranks", type=int, help="measure this many ranks only, in this process (for a clean RSS)")
    parser.add_argument("--folder", help="an already written checkpoint")
    args = parser.parse_args()
    if args.ranks is None:
        folder = write_checkpoint(Path(tempfile.mkdtemp()) / "qwen2-0.5b-random", args.layers)
        print(f"CPU: {cpu_model()}; Qwen2-0.5B shapes, {args.layers} layers, fp32; at 2 ranks each gets half the cores")
        for ranks in (1, 2):
            subprocess.run([sys.executable, __file__, "--ranks", str(ranks), "--folder", str(folder), "--tokens",
                            str(args.tokens), "--batch", *map(str, args.batch)], check=True)
        return
    measure(Path(args.folder), args.ranks, args.batch, args.tokens)


def measure(folder: Path, ranks: int, batches: list[int], tokens: int) -> None:
    config = EngineConfig(kv_cache_memory=512 << 20, max_model_len=1024)
    engine = LLMEngine.from_model(str(folder), dtype="float32", device="cpu", config=config,
                                  tensor_parallel_size=ranks)
    workers = engine.leader.processes if engine.leader is not None else []
    rss = [peak_rss_mib(os.getpid())] + [peak_rss_mib(p.pid) for p in workers]
    for batch in batches:
        with ReduceTimer() as timer:
            rate, steps = decode_rate(engine, batch, tokens)
        reduce_ms = timer.seconds / max(steps, 1) * 1000
        print(f"ranks {ranks} batch {batch}: {rate:.1f} tok/s, all-reduce {reduce_ms:.2f} ms/step "
              f"({timer.calls // max(steps, 1)} per step)")
    print(f"ranks {ranks}: peak RSS per rank after loading {', '.join(f'{m:.0f} MiB' for m in rss)}")
    engine.close()


if __name__ == "__main__":
    main()
