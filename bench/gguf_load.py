"""Load time and memory of a GGUF file: qwen-serve against llama.cpp's llama-server, one after the other.

For each server: seconds from start until ``/health`` answers 200, then the process's resident memory (VmRSS, which
counts the mapped file's pages it has read) and its high-water mark (VmHWM). qwen-serve runs with a stated KV
budget (``--kv-cache-memory``), so its bound, 1.3 x the file + that budget, is printed beside it.

Usage: python bench/gguf_load.py FILE.gguf [--kv-cache-memory 2GiB] [--llama-server PATH]
       (llama-server: ``../shared/bench/setup-llama-server.sh`` builds it; default under ~/.cache/qwen-peers)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from servers import wait_healthy

from server.settings import parse_bytes

PEER = Path(os.environ.get("PEER_DIR", Path.home() / ".cache/qwen-peers")) / "llama.cpp-build/bin/llama-server"


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def measure(label: str, command: list[str], port: int) -> tuple[float, int, int]:
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, seconds=600)
        seconds = time.monotonic() - start
        rss, peak = memory(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    print(f"{label:<13} ready in {seconds:5.1f} s, RSS {rss / 2**30:5.2f} GiB, peak {peak / 2**30:5.2f} GiB")
    return seconds, rss, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--kv-cache-memory", default="2GiB")
    parser.add_argument("--llama-server", type=Path, default=PEER)
    args = parser.parse_args()
    size, kv = args.model.stat().st_size, parse_bytes(args.kv_cache_memory)
    print(f"{args.model.name}: {size / 2**30:.2f} GiB; qwen-serve KV budget {kv / 2**30:.2f} GiB; "
          f"bound 1.3 x file + KV = {(1.3 * size + kv) / 2**30:.2f} GiB")
    qwen = measure("qwen-serve", [str(Path(sys.executable).with_name("qwen-serve")), "--model", str(args.model),
                                  "--port", "18541", "--kv-cache-memory", args.kv_cache_memory], 18541)
    llama = measure("llama-server", [str(args.llama_server), "-m", str(args.model), "--port", "18542", "-c", "8192",
                                     "-np", "16", "--kv-unified", "-t", "2"], 18542)
    print(f"qwen-serve/llama-server: load time {qwen[0] / llama[0]:.2f}x (bound 2x), peak RSS within the bound: "
          f"{qwen[2] <= 1.3 * size + kv}")


if __name__ == "__main__":
    main()
