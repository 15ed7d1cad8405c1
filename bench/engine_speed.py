"""Engine throughput on the embedded SmolLM2, against HF transformers measured in the same run.

Prints tokens/s for: HF ``generate`` one request at a time (the seed's way), HF left-padded batch of 16, our
engine with one request at a time, our engine with 16 concurrent requests; then the ratios.

``--shape qwen-7b`` (with ``--device cuda``) instead builds random weights with Qwen-7B-Chat's shapes on the
device and reports batch-1 decode tok/s against the memory-bandwidth bound (weight bytes per token over the
device's measured copy bandwidth) and the aggregate tok/s of 64 concurrent requests.

Usage: python bench/engine_speed.py [--new-tokens 64] [--dtype auto|float32|bfloat16] [--cpu-isa auto|avx512|avx2|torch]
       python bench/engine_speed.py --device cuda --shape qwen-7b [--weights dense|int4] [--concurrency 64]
           [--layers N]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
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


def decode_only_rate(engine: LLMEngine, prompt: list[int], new_tokens: int) -> float:
    """Tokens per second of one request's decode steps (its prefill step left out of the clock)."""
    engine.add_request("decode", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    engine.step()
    synchronize(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (new_tokens - 1) / (time.perf_counter() - start)


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    """Bytes per second the device moves in a large copy (read + write)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    synchronize(device)
    return 2 * 10 * size / (time.perf_counter() - start)


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer but an untied embedding table (it reads one
    row a token)."""
    skip = model.embed if model.lm_head is not None else None
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not skip)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_report(args: argparse.Namespace) -> None:
    """Qwen-7B-Chat shapes with random weights: batch-1 decode against the bandwidth bound, and concurrency."""
    from random_model import random_qwen_7b

    from engine.device import select_device, select_dtype
    from engine.weights.loader import int4_kernel_for

    device = select_device(args.device)
    dtype = select_dtype(None if args.dtype == "auto" else args.dtype, device)
    kernel = (args.int4_kernel or int4_kernel_for(device, dtype, args.cpu_isa)) if args.weights == "int4" else None
    if args.weights == "int4" and kernel is None:
        raise SystemExit(f"no int4 kernel for {dtype} on {device}")
    loaded = random_qwen_7b(device, dtype, args.layers, int4_kernel=kernel, act_order=args.act_order)
    weight_bytes = streamed_bytes(loaded.model)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=2048, enforce_eager=args.enforce_eager,
                                            kv_cache_dtype=args.kv_cache_dtype,
                                            scheduler=SchedulerConfig(max_num_seqs=max(args.concurrency, 1))))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (128,), generator=generator).tolist() for _ in range(args.concurrency)]
    n = args.new_tokens
    our_rate(engine, prompts[:1], 4, concurrent=True)  # warm-up
    decode_rate = decode_only_rate(engine, prompts[0], n)
    bound = copy_bandwidth(device) / weight_bytes
    our_rate(engine, prompts, 2, concurrent=True)  # warm-up at full width (kernel builds, graph capture)
    aggregate = our_rate(engine, prompts, n, concurrent=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    attention = "varlen" if loaded.model.uses_varlen(2) else "SDPA"
    if loaded.model.uses_paged_decode:
        attention += " prefill, Triton paged decode" + (", eager" if args.enforce_eager else ", CUDA graphs")
    gate_up = loaded.model.layers[0].mlp.gate_up
    inner = getattr(gate_up, "linear", None)
    linear = type(gate_up).__name__ + ("" if inner is None else f" of {type(inner).__name__}")
    print(f"Qwen-7B-Chat shapes ({loaded.config.num_layers} layers, random weights), {dtype}, {linear}, {name}, "
          f"{attention} attention, KV cache {args.kv_cache_dtype}; {weight_bytes / 1e9:.2f} GB read per decode step, "
          f"{n} new tokens per request")
    print(f"batch-1 decode: {decode_rate:7.1f} tok/s; bandwidth bound {bound:7.1f} tok/s "
          f"({decode_rate / bound:.0%} of it)")
    print(f"{args.concurrency} concurrent requests: {aggregate:7.1f} tok/s aggregate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-isa", choices=["auto", "avx512", "avx2", "torch"], default="auto",
                        help="4-bit weights on a bf16 CPU: the int4 x int8 kernel or torch's weight-only one")
    parser.add_argument("--shape", choices=["smollm2", "qwen-7b"], default="smollm2")
    parser.add_argument("--concurrency", type=int, default=64, help="requests at once (--shape qwen-7b)")
    parser.add_argument("--layers", type=int, help="fewer layers, for a quick run (--shape qwen-7b)")
    parser.add_argument("--int4-kernel", choices=["tinygemm", "triton", "torch", "avx512", "avx2"],
                        help="--weights int4: this kernel instead of the engine's choice")
    parser.add_argument("--enforce-eager", action="store_true", help="--shape qwen-7b on CUDA: no CUDA graphs")
    parser.add_argument("--weights", choices=["dense", "int4"], default="dense",
                        help="--shape qwen-7b: dense matrices, or 4-bit ones (as Qwen-7B-Chat-Int4) on the int4 kernel")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto",
                        help="--shape qwen-7b: keys and values in the model's dtype or in 8 bits")
    parser.add_argument("--act-order", action="store_true",
                        help="--weights int4: GPTQ act-order's input orders (inputs gathered before each product)")
    args = parser.parse_args()
    if args.shape == "qwen-7b":
        return shape_report(args)
    path = asset_path(SMOLLM2_GGUF)
    engine = LLMEngine.from_model(str(path), dtype=args.dtype, device=args.device, cpu_isa=args.cpu_isa,
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
