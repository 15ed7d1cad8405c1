"""A real server with the default limits, for hostile requests; fixtures shared with the integration tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from server.settings import Settings
from tests.integration.conftest import SMOL_NAME, RunningServer, engine_for, serve, smol_loaded  # noqa: F401

HEALTH_SECONDS = 1.0
ORDINARY = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


@pytest.fixture(scope="session")
def hostile_server(smol_loaded) -> Iterator[RunningServer]:  # noqa: F811
    engine = engine_for(smol_loaded)
    yield from serve(Settings(served_model_name=SMOL_NAME, grammar_timeout=20), engine)
    engine.shutdown()


def send(server: RunningServer, method: str, path: str, *, body: object = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    """Send one hostile request while probing /health; the probes must all answer 200 within ``HEALTH_SECONDS``."""
    content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    result: dict[str, httpx.Response | BaseException] = {}

    def hostile() -> None:
        try:
            result["response"] = httpx.request(method, server.url + path, content=content, timeout=120,
                                               headers={"content-type": "application/json", **(headers or {})})
        except BaseException as exc:
            result["response"] = exc

    thread = threading.Thread(target=hostile)
    thread.start()
    probes = []
    with httpx.Client(timeout=5) as probe:
        while thread.is_alive() or not probes:
            started = time.monotonic()
            status = probe.get(server.url + "/health").status_code
            probes.append((status, time.monotonic() - started))
            time.sleep(0.05)
    thread.join()
    slow = [p for p in probes if p[0] != 200 or p[1] > HEALTH_SECONDS]
    assert not slow, f"/health while a hostile request ran: {slow}"
    response = result["response"]
    assert isinstance(response, httpx.Response), response
    return response


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def assert_still_serving(server: RunningServer) -> None:
    """An ordinary request on the same process succeeds afterwards."""
    response = httpx.post(server.url + "/v1/chat/completions", json=ORDINARY, timeout=60)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
