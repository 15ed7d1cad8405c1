"""An engine failure that no one request caused: logged with its traceback, every request fails cleanly (streams
end with an error event), /health turns 503, and the process exits non-zero so its supervisor restarts it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx

from server.settings import Settings
from tests.integration.conftest import SMOL_NAME, engine_for, free_port, serve, wait_healthy

CHAT = "/v1/chat/completions"
BODY = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 30,
        "logit_bias": {"0": -100, "1": -100, "2": -100}}
FAULT_AFTER_STEPS = 4

# The server's own entry point, with the model runner failing from its fifth forward pass on.
INJECTED = textwrap.dedent(f"""
    import sys
    from engine.runner import ModelRunner

    real, steps = ModelRunner.run, []

    def failing(self, batch, all_logits=False):
        steps.append(1)
        if len(steps) > {FAULT_AFTER_STEPS}:
            raise RuntimeError("injected device fault")
        return real(self, batch, all_logits)

    ModelRunner.run = failing
    from server.cli import main
    main(sys.argv[1:])
""")


def stream_events(url: str) -> list[str]:
    with httpx.stream("POST", url + CHAT, json={**BODY, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def failing_engine(smol_loaded):
    """An engine whose runner fails from its fifth forward pass on."""
    engine = engine_for(smol_loaded)
    real, steps = engine._engine.runner.run, []

    def failing(batch, all_logits=False):
        steps.append(1)
        if len(steps) > FAULT_AFTER_STEPS:
            raise RuntimeError("injected device fault")
        return real(batch, all_logits)

    engine._engine.runner.run = failing
    return engine


def named_events(url: str, path: str, body: dict) -> list[tuple[str, dict]]:
    """A stream of named SSE events (the Responses and Messages APIs), as (event, data) pairs."""
    events: list[tuple[str, dict]] = []
    with httpx.stream("POST", url + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_failure_mid_stream_ends_a_response_with_response_failed(smol_loaded):
    for server in serve(Settings(served_model_name=SMOL_NAME), failing_engine(smol_loaded)):
        events = named_events(server.url, "/v1/responses", {
            "model": SMOL_NAME, "input": "Tell me a story.", "max_output_tokens": 30, "stream": True})
        names = [name for name, _ in events]
        assert "response.output_text.delta" in names  # it streamed before the fault
        assert names[-1] == "response.failed" and names.count("response.failed") == 1
        assert names[-2] == "response.output_item.done"  # the open message is closed first
        failed = events[-1][1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert "engine" in failed["error"]["message"]


def test_a_failure_mid_stream_ends_a_message_with_an_error_event(smol_loaded):
    for server in serve(Settings(served_model_name=SMOL_NAME), failing_engine(smol_loaded)):
        events = named_events(server.url, "/v1/messages", {
            "model": SMOL_NAME, "max_tokens": 30, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a story."}]})
        names = [name for name, _ in events]
        assert "content_block_delta" in names and "message_stop" not in names
        assert events[-1] == ("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "the engine has failed; the server must be restarted"}})


def test_engine_failure_fails_requests_and_health_in_process(smol_loaded):
    for server in serve(Settings(served_model_name=SMOL_NAME), failing_engine(smol_loaded)):
        events = stream_events(server.url)
        error = json.loads(events[-2])["error"]
        assert events[-1] == "[DONE]" and error["code"] == "engine_dead" and error["type"] == "service_unavailable"
        assert any('"content"' in event for event in events[:-2])  # it streamed before the fault
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["error"]["message"]
        refused = httpx.post(server.url + CHAT, json=BODY, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"


def test_engine_failure_is_logged_and_exits_non_zero():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", INJECTED, "--port", str(port), "--served-model-name", SMOL_NAME,
         "--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--drain-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(url, 120)
        events = stream_events(url)
        assert json.loads(events[-2])["error"]["code"] == "engine_dead"
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode not in (0, None)
    assert "the engine failed" in output and "Traceback" in output and "injected device fault" in output
