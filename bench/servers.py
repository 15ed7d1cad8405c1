"""Starting servers for the benchmarks (wait until one answers its health check), and the host's CPU to print beside
every figure."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    """Return once ``url``/health answers 200 (a server still loading answers 503); exit if ``process`` ends first
    or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited (status {process.returncode})")
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not healthy within {seconds:.0f} s")


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_model() -> str:
    """The CPU's model name and the vector extensions the kernels use."""
    name, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    return f"{name} ({' '.join(f for f in SIMD_FLAGS if f in flags) or 'no AVX2'})"
