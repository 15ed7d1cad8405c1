"""Engine throughput on the embedded SmolLM2, against HF transformers measured in the same run.

Prints tokens/s for: HF ``generate`` one request at a time (the seed's way), HF left-padded batch of 16, our
engine with one request at a time, our engine with 16 concurrent requests; then the ratios.

Usage: python bench/engine_speed.py [--new-tokens 64] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from tokenizer import ChatMessage, build_prompt

TOPICS = ["the sea", "a robot", "winter", "coffee", "the moon", "a library", "trains", "music", "a garden",
          "mountains", "the city at night", "a cat", "rain", "an old map", "bread", "the desert"]


def hf_rate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Generated tokens per second of one left-padded ``generate`` call over ``prompts``."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad_id)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def our_rate(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, concurrent: bool) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    groups = [prompts] if concurrent else [[p] for p in prompts]
    for group in groups:
        for index, ids in enumerate(group):
            engine.add_request(str(index), ids, params)
        while engine.has_unfinished():
            engine.step()
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    path = asset_path(SMOLLM2_GGUF)
    engine = LLMEngine.from_model(str(path), dtype=args.dtype, device="cpu",
                                  config=EngineConfig(max_model_len=1024, kv_cache_memory=256 << 20))
    prompts = [build_prompt(engine.tokenizer, [ChatMessage("user", f"Write a long story about {t}.")]).token_ids
               for t in TOPICS]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    pad = engine.tokenizer.eos_token_id
    n, few = args.new_tokens, prompts[: args.sequential_requests]
    print(f"SmolLM2-135M-Instruct, CPU x{torch.get_num_threads()}, {n} new tokens per request; "
          f"ours: {engine.dtype}, {type(engine.runner.model.layers[0].attn.qkv).__name__}")
    our_rate(engine, prompts[:2], 4, concurrent=True)  # warm-up
    hf_rate(hf, prompts[:1], 4, pad)
    results = {
        "hf_seq_b1": sum(hf_rate(hf, [p], n, pad) for p in few) / len(few),
        "hf_batch16": hf_rate(hf, prompts, n, pad),
        "ours_b1": our_rate(engine, few, n, concurrent=False),
        "ours_c16": our_rate(engine, prompts, n, concurrent=True),
    }
    for name, rate in results.items():
        print(f"{name:>11}: {rate:8.1f} tok/s")
    print(f"ours@16 / HF sequential  = {results['ours_c16'] / results['hf_seq_b1']:5.2f}x  (target >= 14)")
    print(f"ours@16 / HF batch 16    = {results['ours_c16'] / results['hf_batch16']:5.2f}x  (target >= 2)")
    print(f"ours@1  / HF batch 1     = {results['ours_b1'] / results['hf_seq_b1']:5.2f}x  (target >= 3)")


if __name__ == "__main__":
    main()
