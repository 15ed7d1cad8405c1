"""Prompt processing against llama.cpp's llama-server on the same host and model, in one run: the time to the
first token of 1K, 2K and 4K-token prompts (one output token, no prompt cache on either side), and what a
prefix-cache hit saves (a second request sharing a 1K-token prefix, on both servers' caches).

Usage: python bench/prefill.py [--llama-server PATH] [--model FILE.gguf] [--sizes 1024,2048,4096]
       [--qwen-args "--cpu-isa avx2"]
The peers are those ../shared/bench/setup-llama-server.sh builds under ~/.cache/qwen-peers (llama.cpp-build, or
llama.cpp-build-avx2 for an AVX2-only build).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

from servers import wait_healthy

PEERS = Path.home() / ".cache" / "qwen-peers"
QWEN_PORT, LLAMA_PORT = 18610, 18611
SIZES = (1024, 2048, 4096)
WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "this",
         "be", "are", "it", "an", "or", "which", "one", "have", "not", "had")


def text(tokens: int, seed: int) -> str:
    """Random words and numbers, about ``tokens`` tokens in SmolLM2's vocabulary (each server counts its own)."""
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(WORDS)}{rng.randint(0, 99)}" for _ in range(tokens // 3))


def post(url: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.load(response)
    return time.perf_counter() - start, answer


def ask_qwen(prompt: str) -> tuple[float, int]:
    seconds, answer = post(
        f"http://127.0.0.1:{QWEN_PORT}/v1/completions",
        {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0},
    )
    return seconds, answer["usage"]["prompt_tokens"]


def ask_llama(prompt: str, cache: bool = False) -> tuple[float, int]:
    seconds, answer = post(
        f"http://127.0.0.1:{LLAMA_PORT}/completion",
        {"prompt": prompt, "n_predict": 1, "temperature": 0, "cache_prompt": cache},
    )
    return seconds, answer["timings"]["prompt_n"]


def prefix_saving(ask, cold_suffix: str, warm_suffix: str) -> tuple[float, float]:
    """(cold, warm) seconds to the first token of a 1K-token prefix plus a suffix, the second after the first."""
    prefix = text(1024, seed=99)
    cold, _ = ask(prefix + cold_suffix)
    warm, _ = ask(prefix + warm_suffix)
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=str(PEERS / "llama.cpp-build" / "bin" / "llama-server"))
    parser.add_argument("--model", default=str(PEERS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="prompt lengths in tokens")
    parser.add_argument("--qwen-args", default="", help="extra qwen-serve flags, e.g. --cpu-isa avx2")
    args = parser.parse_args()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    llama = subprocess.Popen([args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(LLAMA_PORT),
                              "-c", "8192", "-np", "1", "-t", "2", "-tb", "2"], **quiet)
    qwen = subprocess.Popen([".venv/bin/qwen-serve", "--model", args.model, "--port", str(QWEN_PORT),
                             "--served-model-name", "bench", "--max-model-len", "8192", "--kv-cache-memory", "2GiB",
                             "--log-level", "warning",
                             *shlex.split(args.qwen_args)], **quiet)
    try:
        wait_healthy(f"http://127.0.0.1:{LLAMA_PORT}", llama)
        wait_healthy(f"http://127.0.0.1:{QWEN_PORT}", qwen)
        ask_qwen(text(256, seed=1))  # warm-up
        ask_llama(text(256, seed=1))
        print(f"prompt processing, one request at a time (qwen-serve {args.qwen_args or 'defaults'}; "
              f"{Path(args.llama_server).parent.parent.name})")
        print(f"{'prompt':>7} {'qwen-serve':>22} {'llama-server':>22} {'ratio':>6}")
        for size in map(int, args.sizes.split(",")):
            prompt = text(size, seed=size)
            (q_seconds, q_tokens), (l_seconds, l_tokens) = ask_qwen(prompt), ask_llama(prompt)
            q_rate, l_rate = q_tokens / q_seconds, l_tokens / l_seconds
            print(f"{size:>7} {q_tokens:>6} tok {q_seconds:6.2f} s {q_rate:5.0f}/s {l_tokens:>6} tok "
                  f"{l_seconds:6.2f} s {l_rate:5.0f}/s {q_rate / l_rate:5.2f}x")
        q_cold, q_warm = prefix_saving(ask_qwen, " first question?", " second question?")
        l_cold, l_warm = prefix_saving(lambda p: ask_llama(p, cache=True), " first question?", " second question?")
        print(
            f"1K shared prefix, time to first token cold / warm: qwen-serve {q_cold:.2f} / {q_warm:.3f} s "
            f"({q_cold / q_warm:.1f}x), llama-server {l_cold:.2f} / {l_warm:.3f} s ({l_cold / l_warm:.1f}x)"
        )
    finally:
        for process in (qwen, llama):
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
