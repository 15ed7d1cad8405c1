"""Embedding throughput against llama.cpp's llama-server on the same GGUF, one server after the other: 1,000 short
passages (~100 tokens each) sent as ``/v1/embeddings`` requests of ``--per-request`` inputs, ``--concurrency`` at a
time; prints passages per second for each and the ratio.

Usage: python bench/embed_speed.py [--model FILE.gguf] [--llama-server PATH] [--passages 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
from servers import cpu_model, wait_healthy

from engine.weights.embedded import SMOLLM2_GGUF, asset_path

PEER = Path("~/.cache/qwen-peers/llama.cpp-build/bin/llama-server").expanduser()
WORDS = ("river", "stone", "light", "garden", "window", "market", "letter", "engine", "forest", "winter", "paper",
         "circle", "signal", "harbor", "question", "mountain", "village", "morning", "station", "pattern")


def passages(count: int, seed: int = 0) -> list[str]:
    """``count`` texts of 80 words (about 100 tokens) drawn from a fixed list."""
    draw = random.Random(seed)
    return [" ".join(draw.choice(WORDS) for _ in range(80)) for _ in range(count)]


async def run_load(url: str, model: str, texts: list[str], per_request: int, concurrency: int) -> float:
    """Passages per second over all of ``texts``."""
    batches = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            reply = await client.post(f"{url}/v1/embeddings", json={"model": model, "input": batch})
            reply.raise_for_status()
            assert len(reply.json()["data"]) == len(batch)

    async with httpx.AsyncClient(timeout=600) as client:
        await worker_warmup(client, url, model, texts[0])
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - started)


async def worker_warmup(client: httpx.AsyncClient, url: str, model: str, text: str) -> None:
    (await client.post(f"{url}/v1/embeddings", json={"model": model, "input": [text]})).raise_for_status()


def serve_and_measure(command: list[str], url: str, texts: list[str], args: argparse.Namespace) -> float:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, process)
        return asyncio.run(run_load(url, "bench", texts, args.per_request, args.concurrency))
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(asset_path(SMOLLM2_GGUF)))
    parser.add_argument("--llama-server", default=str(PEER))
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=8131)
    args = parser.parse_args()
    texts = passages(args.passages)
    url = f"http://127.0.0.1:{args.port}"
    ours = serve_and_measure([sys.executable, "-m", "server.cli", "--model", args.model, "--task", "embed",
                              "--served-model-name", "bench", "--no-ui", "--port", str(args.port)], url, texts, args)
    theirs = serve_and_measure([args.llama_server, "-m", args.model, "--embedding", "--pooling", "last",
                                "--port", str(args.port), "-c", "8192", "-b", "2048", "-ub", "2048",
                                "--parallel", str(args.concurrency)], url, texts, args)
    print(f"host: {cpu_model()}; {Path(args.model).name}; {args.passages} passages of ~100 tokens, "
          f"{args.per_request} per request, {args.concurrency} requests at a time")
    print(f"qwen-serve {ours:8.1f} passages/s\nllama-server {theirs:6.1f} passages/s\nratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
