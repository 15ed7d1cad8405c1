"""Starting servers for the benchmarks: wait until one answers its health check."""

from __future__ import annotations

import subprocess
import time

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
