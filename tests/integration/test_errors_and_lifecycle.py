"""Every error class in OpenAI's shape, auth, backpressure, draining, and clients that go away."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.integration.conftest import SMOL_NAME, engine_for, serve

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
NO_END = {"0": -100, "1": -100, "2": -100}  # SmolLM2's end-of-turn tokens: force the full length


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"]
    return error


@pytest.mark.parametrize("body,param", [
    ({"model": SMOL_NAME, "messages": []}, "messages"),
    ({"model": SMOL_NAME}, "messages"),
    ({"model": SMOL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": SMOL_NAME, "messages": HELLO, "temperature": 5}, "temperature"),
    ({"model": SMOL_NAME, "messages": HELLO, "top_p": 0}, "top_p"),
    ({"model": SMOL_NAME, "messages": HELLO, "n": 100}, "n"),
    ({"model": SMOL_NAME, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": SMOL_NAME, "messages": HELLO, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"model": SMOL_NAME, "messages": HELLO, "top_logprobs": 2}, None),
    ({"model": SMOL_NAME, "messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": SMOL_NAME, "messages": HELLO, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"model": SMOL_NAME, "messages": HELLO, "stop": ["x"] * 40}, "stop"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"model": SMOL_NAME, "messages": "hello"}, "messages"),
])
def test_invalid_bodies_get_400(smol_server, body, param):
    error = assert_error(httpx.post(smol_server.url + CHAT, json=body), 400)
    if param:
        assert (error["param"] or "").startswith(param)


def test_malformed_json_gets_400(smol_server):
    response = httpx.post(smol_server.url + CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_completions_validation(smol_server):
    assert_error(httpx.post(smol_server.url + "/v1/completions", json={"model": SMOL_NAME, "prompt": []}), 400)
    assert_error(httpx.post(smol_server.url + "/v1/completions",
                            json={"model": SMOL_NAME, "prompt": [1, 2, 10**9]}), 400, "token ids")


def test_unknown_model_gets_404(smol_server):
    assert_error(httpx.post(smol_server.url + CHAT, json={"model": "gpt-9", "messages": HELLO}), 404, "gpt-9")
    assert_error(httpx.get(smol_server.url + "/v1/models/gpt-9"), 404)
    assert httpx.get(smol_server.url + f"/v1/models/{SMOL_NAME}").json()["id"] == SMOL_NAME


@pytest.fixture(scope="module")
def strict_server(smol_server):
    """A max_tokens beyond the context is a 400 here, as OpenAI answers it."""
    yield from serve(Settings(served_model_name=SMOL_NAME, clamp_max_tokens=False), smol_server.engine)


def test_context_overflow_names_both_numbers(strict_server):
    response = httpx.post(strict_server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO, "max_tokens": 5000})
    error = assert_error(response, 400, "2048")
    prompt_tokens = httpx.post(strict_server.url + "/tokenize", json={"messages": HELLO}).json()["count"]
    assert str(prompt_tokens + 5000) in error["message"]


def test_a_prompt_over_the_context_is_refused_whatever_the_setting(smol_server, strict_server):
    long = [{"role": "user", "content": "word " * 3000}]
    for server in (smol_server, strict_server):
        assert_error(httpx.post(server.url + CHAT, json={"model": SMOL_NAME, "messages": long}), 400, "2048")


def test_max_tokens_sized_for_a_larger_context_is_cut_to_what_is_left(smol_server):
    """Coding agents send max_tokens of 8,000-32,000: the reply may fill the context and ends with "length"."""
    messages = [{"role": "user", "content": "word " * 1990}]
    prompt_tokens = httpx.post(smol_server.url + "/tokenize", json={"messages": messages}).json()["count"]
    assert 1900 < prompt_tokens < 2048
    no_stop = {"0": -100, "1": -100, "2": -100}  # SmolLM2's end tokens: the reply runs until the context is full
    response = httpx.post(smol_server.url + CHAT, timeout=120, json={
        "model": SMOL_NAME, "messages": messages, "max_tokens": 32_000, "temperature": 0, "logit_bias": no_stop})
    assert response.status_code == 200, response.text[:300]
    reply = response.json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 2048 - prompt_tokens


@pytest.fixture(scope="module")
def keyed_server(smol_server):
    yield from serve(Settings(served_model_name=SMOL_NAME, api_key=["k1", "second-key"]), smol_server.engine)


def test_api_keys(keyed_server):
    url = keyed_server.url
    body = {"model": SMOL_NAME, "messages": HELLO, "max_tokens": 2}
    assert_error(httpx.post(url + CHAT, json=body), 401)
    assert_error(httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic k1"}), 401)
    assert httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer second-key"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert_error(httpx.get(url + "/metrics"), 401)  # with keys set, metrics need one too
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_metrics_made_public_by_open_paths(smol_server):
    settings = Settings(served_model_name=SMOL_NAME, api_key=["k1"], open_paths=["/health", "/metrics"])
    for server in serve(settings, smol_server.engine):
        assert "vllm:num_requests_running" in httpx.get(server.url + "/metrics").text
        assert_error(httpx.get(server.url + "/v1/models"), 401)


def test_body_too_large_gets_413(smol_server):
    for server in serve(Settings(served_model_name=SMOL_NAME, max_request_bytes=2000), smol_server.engine):
        big = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_error(httpx.post(server.url + CHAT, json=big), 413)
        assert httpx.post(server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO, "max_tokens": 1}
                          ).status_code == 200


def test_full_queue_gets_429_with_retry_after(smol_loaded):
    engine = engine_for(smol_loaded, max_num_seqs=1, max_waiting=0)
    try:
        for server in serve(Settings(served_model_name=SMOL_NAME), engine):
            long = {"model": SMOL_NAME, "messages": HELLO, "max_tokens": 400, "stream": True, "logit_bias": NO_END}
            with httpx.stream("POST", server.url + CHAT, json=long, timeout=60) as first:
                assert first.status_code == 200
                lines = first.iter_lines()
                assert next(line for line in lines if '"content":"' in line and '"role"' not in line)
                deadline = time.monotonic() + 30  # the engine publishes its stats just after handing the token out
                while engine.stats.running != 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert engine.stats.running == 1
                response = httpx.post(server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO, "max_tokens": 2},
                                      timeout=60)
                assert_error(response, 429)
                assert response.headers["retry-after"] == "1"
    finally:
        engine.shutdown()


def test_draining_server_refuses_new_work(smol_server):
    for server in serve(Settings(served_model_name=SMOL_NAME), smol_server.engine):
        server.app.state.qwen.draining = True
        assert_error(httpx.post(server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO}), 503)
        assert_error(httpx.get(server.url + "/health"), 503, "shutting down")


def test_model_that_fails_to_load_reports_503(tmp_path):
    from starlette.testclient import TestClient

    app = create_app(Settings(model=str(tmp_path / "missing")))
    with TestClient(app) as http:
        for _ in range(100):
            if app.state.qwen.load_error is not None:
                break
            time.sleep(0.05)
        assert_error(http.get("/health"), 503, "failed to load")
        assert_error(http.get("/v1/models"), 503)


def wait_for_idle(server, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.metric("vllm:num_requests_running") == 0 and server.engine.stats.kv_cache_usage == 0:
            return True
        time.sleep(0.05)
    return False


def test_mid_stream_disconnects_free_their_slots(smol_server):
    body = {"model": SMOL_NAME, "messages": HELLO, "max_tokens": 1000, "stream": True, "logit_bias": NO_END}
    clients = [httpx.Client(timeout=60) for _ in range(8)]
    streams = [c.stream("POST", smol_server.url + CHAT, json=body) for c in clients]
    responses = [s.__enter__() for s in streams]
    for response in responses:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
    assert smol_server.metric("vllm:num_requests_running") > 0
    for response, client in zip(responses, clients, strict=True):
        response.close()
        client.close()
    assert wait_for_idle(smol_server)
    ok = httpx.post(smol_server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO, "max_tokens": 4})
    assert ok.status_code == 200


def test_non_streaming_client_that_times_out_frees_its_slot(smol_server):
    body = {"model": SMOL_NAME, "messages": HELLO, "max_tokens": 1000, "logit_bias": NO_END}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(smol_server.url + CHAT, json=body, timeout=1.0)
    assert wait_for_idle(smol_server)


def test_request_id_is_echoed_or_generated(smol_server):
    assert httpx.get(smol_server.url + "/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == \
        "abc-123"
    assert len(httpx.get(smol_server.url + "/health").headers["x-request-id"]) == 32


def test_tokenize_detokenize_version_docs(smol_server):
    url = smol_server.url
    tokens = httpx.post(url + "/tokenize", json={"model": SMOL_NAME, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2
    assert httpx.post(url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert_error(httpx.post(url + "/tokenize", json={"prompt": "a", "messages": HELLO}), 400)
    assert httpx.get(url + "/version").json()["version"]
    assert httpx.get(url + "/docs").status_code == 200


def test_every_metric_on_the_grafana_dashboard_is_exported(smol_server):
    """The dashboard's queries name series the server really exports (checked after some traffic)."""
    httpx.post(f"{smol_server.base}/chat/completions", timeout=60, json={
        "model": SMOL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    exported = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{smol_server.url}/metrics").text.splitlines()
                if line and not line.startswith("#")}
    dashboard = json.loads((Path(__file__).parents[2] / "docker/grafana/dashboards/qwen-serve.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"vllm:[a-z0-9_]+", target["expr"])}
    assert len(queried) >= 8
    assert queried <= exported, queried - exported


@pytest.fixture(scope="module")
def defaults_server(smol_server):
    """The model's generation config overridden: greedy, five tokens unless a request says otherwise."""
    overrides = {"temperature": 0, "max_new_tokens": 5}
    yield from serve(Settings(served_model_name=SMOL_NAME, override_generation_config=overrides),
                     smol_server.engine)


def test_generation_defaults_can_be_overridden_for_requests_that_leave_them_out(defaults_server):
    replies = [httpx.post(defaults_server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO}, timeout=60).json()
               for _ in range(2)]
    assert [r["usage"]["completion_tokens"] for r in replies] == [5, 5]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]  # greedy
    asked = httpx.post(defaults_server.url + CHAT, json={"model": SMOL_NAME, "messages": HELLO, "max_tokens": 9,
                                                        "temperature": 0}, timeout=60).json()
    assert asked["usage"]["completion_tokens"] == 9
