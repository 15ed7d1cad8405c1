"""The int8 KV cache against the model-dtype one on the embedded SmolLM2 (native kernels), in one run: tokens the
same memory holds, and batch-1 decode tok/s with 1K and 4K tokens of context.

Usage: python bench/kv_cache.py [--dtype auto|float32|bfloat16] [--cpu-isa auto|avx512|avx2] [--budget 512MiB]
"""

from __future__ import annotations

import argparse
import time

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kv_store import kv_bytes_per_token
from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from server.settings import parse_bytes

NEW_TOKENS = 32


def decode_rate(engine: LLMEngine, context: int) -> float:
    """Tokens per second of one request's decode steps after a ``context``-token prompt (prefill not timed)."""
    prompt = torch.randint(100, 40000, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    engine.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (NEW_TOKENS - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-isa", default="auto")
    parser.add_argument("--budget", default="512MiB")
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    path = str(asset_path(SMOLLM2_GGUF))
    rows = []
    for kv in ("auto", "int8"):
        engine = LLMEngine.from_model(path, dtype=args.dtype, device="cpu", cpu_isa=args.cpu_isa,
                                      config=EngineConfig(max_model_len=4200, kv_cache_memory=budget,
                                                          kv_cache_dtype=kv))
        tokens = budget // kv_bytes_per_token(engine.model_config, engine.dtype, kv)
        decode_rate(engine, 64)  # warm-up
        rows.append((kv, engine.dtype, tokens, decode_rate(engine, 1024), decode_rate(engine, 4096)))
    print(f"SmolLM2-135M-Instruct, CPU x{torch.get_num_threads()}, --cpu-isa {args.cpu_isa}; KV budget {args.budget}; "
          f"{NEW_TOKENS} new tokens, batch 1")
    print(f"{'kv cache':>9} {'model':>15} {'tokens held':>12} {'tok/s @1K':>10} {'tok/s @4K':>10}")
    for kv, dtype, tokens, at_1k, at_4k in rows:
        print(f"{kv:>9} {dtype!s:>15} {tokens:>12} {at_1k:>10.1f} {at_4k:>10.1f}")
    print(f"int8 / {rows[0][0]}: {rows[1][2] / rows[0][2]:.2f}x the tokens, {rows[1][3] / rows[0][3]:.2f}x tok/s @1K, "
          f"{rows[1][4] / rows[0][4]:.2f}x tok/s @4K")


if __name__ == "__main__":
    main()
