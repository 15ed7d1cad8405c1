"""Every test here is a CUDA dry run (``pytest -m gpu_dry`` runs them alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ModelConfig
from tests.conftest import FIXTURES

CONFIGS = FIXTURES / "configs"
MODELS = ["qwen-7b-chat", "qwen-7b-chat-int4", "qwen-7b-chat-awq", "qwen2-7b-instruct"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu_dry)


def raw_config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def model_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf(raw_config(name))
