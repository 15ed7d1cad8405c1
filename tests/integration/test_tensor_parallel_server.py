"""``qwen-serve --tensor-parallel-size 2`` as a real process (rank 0 serving, one worker process), on a tiny
Qwen-1 with the real vocabulary: the same replies and logprobs as the unsplit model over HTTP; a worker killed in
the middle of a request fails that request, turns /health to 503 and takes the server down with a non-zero status
within the collective timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import QWEN_NAME, RunningServer, StreamReader, free_port, wait_healthy

TIMEOUT_S = 10  # QWEN_SERVE_TP_TIMEOUT for these servers
ASK = {"model": QWEN_NAME, "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
       "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 3, "logit_bias": {"151643": -100}}


def start(folder: Path, ranks: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--model", str(folder), "--served-model-name", QWEN_NAME, "--port",
         str(port), "--dtype", "float32", "--tensor-parallel-size", str(ranks), "--max-model-len", "1024",
         "--kv-cache-memory", "64MiB", "--log-level", "warning"],
        env={**os.environ, "QWEN_SERVE_TP_TIMEOUT": str(TIMEOUT_S), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, 180):
        process.kill()
        raise AssertionError(f"the server did not start: {process.communicate()[0][-2000:]}")
    return process, url


@pytest.fixture(scope="module")
def split_server(qwen1_folder) -> Iterator[str]:
    process, url = start(qwen1_folder, 2)
    yield url
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0  # a clean stop also stops the worker
    assert workers(process.pid) == []


def health(url: str) -> int | None:
    """The /health status, or None when nothing listens any more (the server is stopping or stopped)."""
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.TransportError:
        return None


def workers(pid: int) -> list[int]:
    """The child processes of ``pid`` (the tensor-parallel workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(child) for child in children]
    return found


def test_split_replies_and_logprobs_equal_the_whole_models(split_server, qwen1_server: RunningServer):
    ours = httpx.post(f"{split_server}/v1/chat/completions", json=ASK, timeout=120).json()["choices"][0]
    theirs = httpx.post(f"{qwen1_server.base}/chat/completions", json=ASK, timeout=120).json()["choices"][0]
    assert ours["message"]["content"] == theirs["message"]["content"]
    assert len(ours["logprobs"]["content"]) == len(theirs["logprobs"]["content"]) == 12
    for mine, reference in zip(ours["logprobs"]["content"], theirs["logprobs"]["content"], strict=True):
        assert mine["token"] == reference["token"]
        assert abs(mine["logprob"] - reference["logprob"]) <= 1e-4
        assert [t["token"] for t in mine["top_logprobs"]] == [t["token"] for t in reference["top_logprobs"]]


def test_a_killed_worker_fails_the_request_and_stops_the_server(qwen1_folder):
    process, url = start(qwen1_folder, 2)
    try:
        (worker,) = workers(process.pid)
        body = {**ASK, "max_tokens": 900, "stream": True, "logprobs": False, "top_logprobs": None}
        reader = StreamReader(url, body, after=10)
        assert reader.started.wait(60)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        reader.join(timeout=60)
        data = reader.lines
        assert data[-1] == "data: [DONE]" and '"error"' in data[-2]  # the request ends with an error event
        assert health(url) in (503, None)  # failed, or already gone
        status = process.wait(timeout=TIMEOUT_S + 30)
        assert status != 0 and time.monotonic() - killed < TIMEOUT_S + 30
    finally:
        if process.poll() is None:
            process.kill()
