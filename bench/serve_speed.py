"""Serving throughput and latency: our server against the seed-style baseline, in one run.

Starts both servers (ours with the embedded model, the baseline in bench/baseline_server.py), drives each with an
async ``openai`` client at concurrency 1, 4 and 16 (every request forced to the full length with logit_bias
against the end-of-turn tokens, so both do equal work), and prints aggregate output tok/s, TTFT p50/p95, ratios.

Usage: python bench/serve_speed.py [--max-tokens 64] [--levels 1,4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

MODEL = "SmolLM2-135M-Instruct"
NO_END = {"0": -100, "1": -100, "2": -100}
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command} did not start")


async def one(client: openai.AsyncOpenAI, index: int, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Write a long story about river number {index}."}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, logit_bias=NO_END,
        temperature=0)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, tokens


async def load(port: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    started = time.perf_counter()
    results = await asyncio.gather(*(one(client, i, max_tokens) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    p95 = statistics.quantiles(ttfts, n=20)[18] if len(ttfts) > 1 else ttfts[0]
    return {"tok_s": sum(r[1] for r in results) / elapsed, "ttft_p50": statistics.median(ttfts), "ttft_p95": p95}


async def measure(ours_port: int, base_port: int, levels: list[int], max_tokens: int) -> None:
    for port in (ours_port, base_port):  # warm-up
        await load(port, 1, 4)
    print(f"{'concurrency':>11} | {'ours tok/s':>10} {'TTFT p50':>9} {'p95':>7} | {'seed tok/s':>10} "
          f"{'TTFT p50':>9} {'p95':>7} | ratio")
    for level in levels:
        ours = await load(ours_port, level, max_tokens)
        base = await load(base_port, level, max_tokens)
        print(f"{level:>11} | {ours['tok_s']:10.1f} {ours['ttft_p50']:8.3f}s {ours['ttft_p95']:6.3f}s | "
              f"{base['tok_s']:10.1f} {base['ttft_p50']:8.3f}s {base['ttft_p95']:6.3f}s | "
              f"{ours['tok_s'] / base['tok_s']:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    ours_port, base_port = free_port(), free_port()
    servers = [
        start([sys.executable, "-m", "server.cli", "--port", str(ours_port), "--max-model-len", "2048",
               "--kv-cache-memory", "512MiB", "--log-level", "warning"], ours_port),
        start([sys.executable, str(ROOT / "bench" / "baseline_server.py"), str(base_port)], base_port),
    ]
    try:
        asyncio.run(measure(ours_port, base_port, levels, args.max_tokens))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
