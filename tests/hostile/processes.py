"""The server as users run it, in a process of its own, and a /health prober in another: a hostile request's cost to
the event loop is measured without the test's own threads sharing the server's interpreter."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from tests.integration.conftest import free_port, wait_healthy

HEALTH_SECONDS = 1.5  # the slowest /health answer allowed while a hostile request runs (a loaded 2-core host)
PROBE = r"""
import json, sys, threading, time, httpx
url, stop, answers = sys.argv[1], threading.Event(), []
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with httpx.Client(timeout=30) as client:
    while True:
        stopping = stop.is_set()  # one more probe after the work ended
        started = time.monotonic()
        try:
            status = client.get(url + "/health").status_code
        except httpx.HTTPError as exc:
            status = repr(exc)
        answers.append((status, time.monotonic() - started))
        if len(answers) == 1:
            print("probing", flush=True)
        if stopping:
            break
        stop.wait(0.05)
print(json.dumps(answers), flush=True)
"""


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen

    @property
    def base(self) -> str:
        return f"{self.url}/v1"


@contextlib.contextmanager
def server_process(*args: str, startup_seconds: float = 120) -> Iterator[ServerProcess]:
    """``qwen-serve ARGS`` on a free loopback port until the context ends; its log goes to the test's output."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
                                "--no-ui", "--log-level", "warning", *args],
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, startup_seconds), "the server process did not become healthy"
        yield ServerProcess(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def health_probe(url: str) -> Iterator[list[tuple[int | str, float]]]:
    """Probe ``url``/health from another process while the context runs; afterwards the list holds every answer
    (status, seconds), at least one from before the context's work and one after it."""
    answers: list[tuple[int | str, float]] = []
    prober = subprocess.Popen([sys.executable, "-c", PROBE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert prober.stdout is not None and prober.stdin is not None
    assert prober.stdout.readline().strip() == "probing"
    try:
        yield answers
    finally:
        out, _ = prober.communicate("", timeout=60)
        answers.extend(tuple(answer) for answer in json.loads(out.strip().splitlines()[-1]))


def send_while_probing(server: ServerProcess, method: str, path: str, *, body: object = None,
                       raw: bytes | None = None, headers: dict[str, str] | None = None,
                       timeout: float = 180) -> httpx.Response:
    """One request while /health is probed from another process: every probe must answer 200 within
    ``HEALTH_SECONDS``."""
    content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    with health_probe(server.url) as answers:
        response = httpx.request(method, server.url + path, content=content, timeout=timeout,
                                 headers={"content-type": "application/json", **(headers or {})})
    slow = [answer for answer in answers if answer[0] != 200 or answer[1] > HEALTH_SECONDS]
    assert len(answers) >= 2 and not slow, f"/health while the request ran: {slow}"
    return response
