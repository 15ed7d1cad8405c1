"""Soak: a real qwen-serve process under streamed load with clients that leave, then 4x overload.

Phase 1 sends ``--requests`` streamed chat requests, ``--concurrency`` at a time; every other one disconnects after
a few chunks. Phase 2 keeps 4 x (seats + queue) requests in flight for ``--overload-seconds``. Prints KV-cache blocks
still held when idle (must be 0), RSS growth from after warm-up to the end (< 5%), requests that hung (0) and the
status mix of the overload (only 200, and 429 with Retry-After). Bounded in count and time; loopback only.

    .venv/bin/python bench/soak.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import subprocess
import sys
import time

import httpx
from servers import wait_healthy

SEATS, QUEUE = 8, 8
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def streamed(client: httpx.AsyncClient, index: int, leave: bool, hung: list[int]) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": 32, "temperature": 0.7, "seed": index,
            "messages": [{"role": "user", "content": f"Tell me fact number {index} about the sea."}]}
    try:
        async with asyncio.timeout(120), client.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if leave and chunks >= 3:
                    return  # closes the connection mid-stream
    except TimeoutError:
        hung.append(index)


async def phase_streams(url: str, requests: int, concurrency: int, pid: int, rss: dict[str, int]) -> list[int]:
    hung: list[int] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(index: int) -> None:
            async with gate:
                await streamed(client, index, index % 2 == 1, hung)
            if index == min(100, requests - 1):
                rss["warm"] = rss_bytes(pid)

        await asyncio.gather(*(one(i) for i in range(requests)))
    return hung


async def phase_overload(url: str, seconds: float, in_flight: int) -> tuple[collections.Counter, int, list[int]]:
    statuses: collections.Counter = collections.Counter()
    missing_retry_after = 0
    hung: list[int] = []
    deadline = time.monotonic() + seconds
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Name a colour."}]}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=in_flight)) as client:

        async def worker(index: int) -> None:
            nonlocal missing_retry_after
            while time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(120):
                        response = await client.post("/v1/chat/completions", json=body)
                except TimeoutError:
                    hung.append(index)
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 429:
                    missing_retry_after += "retry-after" not in response.headers
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker(i) for i in range(in_flight)))
    return statuses, missing_retry_after, hung


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(port), "--max-model-len", "512",
                               "--max-num-seqs", str(SEATS), "--max-waiting", str(QUEUE), "--log-level", "warning"])
    try:
        wait_healthy(url, server, seconds=120)
        rss: dict[str, int] = {}
        started = time.monotonic()
        hung = asyncio.run(phase_streams(url, args.requests, args.concurrency, server.pid, rss))
        streams_seconds = time.monotonic() - started
        statuses, missing, overload_hung = asyncio.run(
            phase_overload(url, args.overload_seconds, 4 * (SEATS + QUEUE)))
        time.sleep(2)
        leaked = metric(url, "qwen_serve:kv_cache_blocks_in_use")
        running = metric(url, "vllm:num_requests_running")
        end_rss = rss_bytes(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    growth = (end_rss - rss["warm"]) / rss["warm"]
    print(f"streamed requests: {args.requests} ({args.requests // 2} left mid-stream) in {streams_seconds:.0f} s")
    print(f"leaked KV blocks when idle: {leaked:.0f} (running requests: {running:.0f})")
    print(f"RSS after warm-up {rss['warm'] / 2**20:.0f} MiB, at the end {end_rss / 2**20:.0f} MiB: "
          f"growth {growth:+.1%}")
    print(f"hung requests: {len(hung) + len(overload_hung)}")
    print(f"overload ({4 * (SEATS + QUEUE)} in flight, {args.overload_seconds:.0f} s): "
          f"{dict(sorted(statuses.items()))}; 429 without Retry-After: {missing}")
    ok = (leaked == 0 and growth < 0.05 and not hung and not overload_hung and set(statuses) <= {200, 429}
          and not missing)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
