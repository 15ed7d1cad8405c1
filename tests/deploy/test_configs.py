"""The ready-made configs in config/: each loads through the real settings class, each key is a flag and a
QWEN_SERVE_* variable, and each starts the server: the embedded one fully (tests/deploy/test_image_steps.py
serves it through the image's entrypoint), the GPU and quantized ones up to model resolution, where an absent
model is a clear error and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser, parse_settings
from server.settings import Settings, load_settings
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
GPU_CONFIGS = [c for c in CONFIGS if c.name != "default.yaml"]


def test_the_five_configs_exist():
    assert {c.name for c in CONFIGS} == {"default.yaml", "qwen-7b-chat.yaml", "qwen-7b-chat-int4.yaml",
                                         "qwen-7b-chat-awq.yaml", "qwen3-8b.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_flags_and_variables(config, monkeypatch):
    values = yaml.safe_load(config.read_text())
    settings = load_settings({}, config)
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for key, value in values.items():
        assert key in Settings.model_fields
        assert "--" + key.replace("_", "-") in flags
        text = ",".join(value) if isinstance(value, list) else str(value)
        monkeypatch.setenv(f"QWEN_SERVE_{key.upper()}", text)
        assert getattr(parse_settings([]), key) == getattr(settings, key), key
    assert all(line.startswith("#") for line in config.read_text().splitlines()[:1]), "document the file"


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_configs_start_up_to_model_resolution(config, tmp_path):
    model = yaml.safe_load(config.read_text())["model"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "QWEN_SERVE_DEVICE": "cpu",
           "QWEN_SERVE_DTYPE": "float32"}
    result = subprocess.run([sys.executable, "-m", "server.cli", "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(free_port()), "--log-level", "warning"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("qwen-serve: the model failed to load:") and repr(model) in message
    assert "hub cache" in message or "neither a local file or folder" in message
