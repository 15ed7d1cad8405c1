"""The ``qwen-serve`` command: settings from flags, environment and YAML; a real process drained by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from server.cli import parse_settings
from tests.integration.conftest import StreamReader, free_port, wait_healthy


def test_flags_beat_environment_beat_yaml(tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 1111\nmax_num_seqs: 4\napi_key: [a, b]\nkv_cache_memory: 1GiB\n")
    assert parse_settings(["--config", str(config)]).port == 1111
    monkeypatch.setenv("QWEN_SERVE_PORT", "2222")
    settings = parse_settings(["--config", str(config)])
    assert (settings.port, settings.max_num_seqs, settings.api_key) == (2222, 4, ["a", "b"])
    assert settings.kv_cache_memory == 1 << 30
    settings = parse_settings(["--config", str(config), "--port", "3333", "--api-key", "x", "--api-key", "y"])
    assert (settings.port, settings.api_key) == (3333, ["x", "y"])


def test_bad_settings_are_refused(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("no_such_setting: 1\n")
    with pytest.raises(Exception, match="no_such_setting"):
        parse_settings(["--config", str(config)])
    with pytest.raises(Exception, match="port"):
        parse_settings(["--port", "99999"])
    result = subprocess.run([sys.executable, "-m", "server.cli", "--port", "-5"], capture_output=True, text=True)
    assert result.returncode != 0 and "invalid settings" in result.stderr


def test_switches_turn_on_and_off_over_their_defaults(tmp_path, monkeypatch):
    assert parse_settings([]).enable_thinking and not parse_settings([]).enforce_eager
    assert not parse_settings(["--no-enable-thinking"]).enable_thinking
    assert parse_settings(["--enforce-eager"]).enforce_eager
    monkeypatch.setenv("QWEN_SERVE_ENABLE_THINKING", "false")
    assert not parse_settings([]).enable_thinking  # an unset flag leaves the environment's value
    assert parse_settings(["--enable-thinking"]).enable_thinking


def test_tool_call_formats_are_checked():
    assert parse_settings(["--tool-call-format", "qwen3_coder"]).tool_call_format == "qwen3_coder"
    with pytest.raises(Exception, match="tool_call_format"):
        parse_settings(["--tool-call-format", "json"])


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True)
    for flag in ("--model", "--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs", "--dtype",
                 "--device", "--kv-cache-memory", "--config", "--host", "--port"):
        assert flag in result.stdout


def test_sigterm_lets_running_requests_finish_then_exits_zero(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--port", str(port), "--max-model-len", "1024",
         "--kv-cache-memory", "128MiB", "--drain-timeout", "60", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_healthy(url, 120), "the server did not become ready"
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "max_tokens": 60, "logit_bias": {"0": -100, "1": -100, "2": -100}}
        reader = StreamReader(url, body)
        assert reader.started.wait(60)
        process.send_signal(signal.SIGTERM)
        reader.join(timeout=90)
        assert process.wait(timeout=90) == 0
        data = reader.lines
        assert data[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in data[-2]
    finally:
        if process.poll() is None:
            process.kill()
