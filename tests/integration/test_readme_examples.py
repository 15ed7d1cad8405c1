"""Every README block fenced as ``sh example`` or ``python example`` runs against a real server: port 8000 is the
embedded model serving chat, port 8001 the same model with ``--task embed``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.settings import Settings
from tests.integration.conftest import SMOL_NAME, RunningServer, engine_for, serve

README = Path(__file__).parents[2] / "README.md"
BLOCKS = re.findall(r"```(sh|python) example\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("sh") >= 2 and kinds.count("python") >= 2


@pytest.fixture(scope="module")
def embed_server(smol_loaded) -> Iterator[RunningServer]:
    engine = engine_for(smol_loaded)
    yield from serve(Settings(served_model_name=SMOL_NAME, task="embed"), engine)
    engine.shutdown()


@pytest.mark.parametrize("kind,code", BLOCKS, ids=[f"{k}{i}" for i, (k, _) in enumerate(BLOCKS)])
def test_readme_example_runs(smol_server, embed_server, kind, code):
    code = code.replace("http://127.0.0.1:8000", smol_server.url).replace("http://127.0.0.1:8001", embed_server.url)
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout.strip()
    assert output and '"error"' not in output
    if "stream" in code and kind == "sh":
        assert output.endswith("data: [DONE]")
