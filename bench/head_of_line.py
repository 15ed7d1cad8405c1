"""Head-of-line blocking under chunked prefill, on the engine itself: with one stream decoding, how much later does
an ordinary request get its first token when a prompt at the context limit arrives with it, against one step's
time? Also what the long prompt's own first token costs, chunked and whole.

Usage: python bench/head_of_line.py [--model FILE.gguf] [--budget 2048] [--cpu-isa auto]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.scheduler import SchedulerConfig
from tokenizer import ChatMessage, build_prompt

STREAM = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def first_tokens(engine: LLMEngine, requests: dict[str, list[int]]) -> tuple[dict[str, float], list[float]]:
    """Seconds from adding ``requests`` (with the stream already running) to each one's first token, and the
    duration of every step taken meanwhile."""
    started = time.perf_counter()
    for request_id, ids in requests.items():
        engine.add_request(request_id, ids, SHORT)
    firsts: dict[str, float] = {}
    steps: list[float] = []
    while len(firsts) < len(requests):
        before = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - before)
        for out in outputs:
            if out.request_id in requests and out.new_token_ids:
                firsts.setdefault(out.request_id, time.perf_counter() - started)
    return firsts, steps


def run(model: str | None, budget: int, cpu_isa: str, context: int) -> None:
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    engine = LLMEngine.from_model(model, cpu_isa=cpu_isa, config=EngineConfig(max_model_len=context,
                                                                               scheduler=scheduler))
    tokenizer = engine.tokenizer
    short = build_prompt(tokenizer, [ChatMessage("user", "Say hi.")]).token_ids
    filler = tokenizer.encode(" ".join(f"word{i % 97}" for i in range(context)))
    long = (short[:-8] + filler)[: context - 16] + short[-8:]
    engine.add_request("stream", short, STREAM)
    for _ in range(3):
        engine.step()
    alone, alone_steps = first_tokens(engine, {"short-alone": short})
    behind, steps = first_tokens(engine, {"long": long, "short": short})
    print(f"budget {budget} tokens a step, long prompt {len(long)} tokens, one stream decoding ({engine.dtype})")
    print(f"  short request alone:           first token {alone['short-alone'] * 1000:8.1f} ms "
          f"({len(alone_steps)} step)")
    print(f"  short request with the long one: first token {behind['short'] * 1000:8.1f} ms; delay "
          f"{(behind['short'] - alone['short-alone']) * 1000:.1f} ms against one step of "
          f"{max(steps) * 1000:.1f} ms (the longest step)")
    print(f"  long prompt: first token {behind['long']:.2f} s over {len(steps)} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf or folder (default: the embedded SmolLM2)")
    parser.add_argument("--budget", type=int, default=SchedulerConfig().max_num_batched_tokens)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--cpu-isa", default="auto")
    args = parser.parse_args()
    print(f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    run(args.model, args.budget, args.cpu_isa, args.context)
    if args.budget < args.context:
        run(args.model, args.context, args.cpu_isa, args.context)  # the whole prompt in one step


if __name__ == "__main__":
    main()
