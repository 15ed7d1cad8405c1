"""Every README block fenced as ``sh example`` or ``python example`` runs against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"
BLOCKS = re.findall(r"```(sh|python) example\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("sh") >= 2 and kinds.count("python") >= 2


@pytest.mark.parametrize("kind,code", BLOCKS, ids=[f"{k}{i}" for i, (k, _) in enumerate(BLOCKS)])
def test_readme_example_runs(smol_server, kind, code):
    code = code.replace("http://127.0.0.1:8000", smol_server.url)
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout.strip()
    assert output and '"error"' not in output
    if "stream" in code and kind == "sh":
        assert output.endswith("data: [DONE]")
