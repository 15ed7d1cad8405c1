"""A real server with the default limits, in a process of its own, for hostile requests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.hostile.processes import ServerProcess, send_while_probing, server_process
from tests.integration.conftest import SMOL_NAME

ORDINARY = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


@pytest.fixture(scope="session")
def hostile_server() -> Iterator[ServerProcess]:
    with server_process("--served-model-name", SMOL_NAME, "--grammar-timeout", "20") as server:
        yield server


def send(server: ServerProcess, method: str, path: str, *, body: object = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    """One hostile request while /health is probed from another process (``processes.send_while_probing``)."""
    return send_while_probing(server, method, path, body=body, raw=raw, headers=headers)


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def refused(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None,
            says: str | None = None) -> dict:
    """The response is ``status`` in OpenAI's envelope, refused by the rule named by ``param``/``code``/``says``."""
    error = assert_envelope(response, status)
    if param is not None:
        assert (error["param"] or "").startswith(param), error
    if code is not None:
        assert error["code"] == code, error
    if says is not None:
        assert says in error["message"], error
    return error


def assert_still_serving(server: ServerProcess, model: str = SMOL_NAME) -> None:
    """An ordinary request on the same process succeeds afterwards."""
    response = httpx.post(server.url + "/v1/chat/completions", json={**ORDINARY, "model": model}, timeout=60)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
