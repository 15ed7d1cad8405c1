"""Where one stream's time per token goes (the embedded SmolLM2, or ``--model``): the engine's decode step alone,
the same through the engine thread and asyncio (``AsyncEngine``), and the same through HTTP and SSE (a real server
and a streaming client); the differences are the hand-offs and the serving layer.

Usage: python bench/latency_breakdown.py [--cpu-isa auto|avx512|avx2] [--dtype auto|float32|bfloat16] [--model F]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import threading
import time
from pathlib import Path

import httpx
from servers import wait_healthy

from engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams
from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from tokenizer import ChatMessage, build_prompt

QUESTION = "Write a long story about a lighthouse keeper."
TOKENS = 128
PORT = 18620


def engine_gaps(engine: LLMEngine, prompt: list[int]) -> list[float]:
    """Seconds of each decode step of one request, stepped directly."""
    engine.add_request("alone", prompt, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))
    engine.step()  # prefill
    gaps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        gaps.append(time.perf_counter() - start)
    return gaps


async def async_gaps(engine: AsyncEngine, prompt: list[int]) -> list[float]:
    """Seconds between the tokens of one request as an asyncio caller receives them from the engine thread."""
    arrivals = []
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    async for _ in engine.generate("async", prompt, params):
        arrivals.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(arrivals[1:])]  # from the second token: the first follows the prefill


def http_gaps(extra: list[str]) -> list[float]:
    """Seconds between SSE chunks of one streamed chat completion from a running qwen-serve."""
    server = subprocess.Popen([".venv/bin/qwen-serve", "--port", str(PORT), "--log-level", "warning", *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{PORT}", server)
        model = httpx.get(f"http://127.0.0.1:{PORT}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS,
                "temperature": 0, "stream": True, "logit_bias": {"2": -100}}
        arrivals = []
        for _ in range(2):  # the first request warms up
            arrivals = []
            with httpx.stream("POST", f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=300) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(arrivals[1:])]
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-isa", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=str(asset_path(SMOLLM2_GGUF)))
    args = parser.parse_args()
    loaded: list[LLMEngine] = []
    loader = threading.Thread(target=lambda: loaded.append(LLMEngine.from_model(
        args.model, dtype=args.dtype, cpu_isa=args.cpu_isa, device="cpu",
        config=EngineConfig(max_model_len=1024))))
    loader.start()  # as the server loads: off the thread that will wait on the engine
    loader.join()
    engine = loaded[0]
    prompt = build_prompt(engine.tokenizer, [ChatMessage("user", QUESTION)]).token_ids
    wrapped = AsyncEngine(engine)

    async def both() -> tuple[list[float], list[float]]:
        # stepped on the engine thread too: torch's OpenMP workers of another thread would spin against these
        await wrapped.call(lambda e: engine_gaps(e, prompt))  # warm-up
        stepped = await wrapped.call(lambda e: engine_gaps(e, prompt))
        return stepped, await async_gaps(wrapped, prompt)  # type: ignore[return-value]

    try:
        stepped_gaps, threaded_gaps = asyncio.run(both())
    finally:
        wrapped.shutdown()
    stepped, threaded = statistics.median(stepped_gaps), statistics.median(threaded_gaps)
    served = statistics.median(http_gaps(["--cpu-isa", args.cpu_isa, "--dtype", args.dtype, "--model", args.model]))
    print(f"{Path(args.model).stem}, one stream, {TOKENS} tokens, --cpu-isa {args.cpu_isa} --dtype {args.dtype}: "
          f"median ms per token")
    print(f"engine step alone        {stepped * 1e3:6.2f}")
    print(f"+ engine thread, asyncio {threaded * 1e3:6.2f}  (+{(threaded - stepped) * 1e3:.2f})")
    print(f"+ HTTP, SSE, client      {served * 1e3:6.2f}  (+{(served - threaded) * 1e3:.2f})")


if __name__ == "__main__":
    main()
