"""The coding agents the tests drive (Codex CLI, Claude Code, Qwen Code): their npm packages at pinned versions,
installed into a cache directory when absent (``python -m tests.integration.agents`` installs them ahead, as
``make install`` does), and their setup read from README's fenced blocks, so the tests run what users copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

PACKAGES = {"codex": ("@openai/codex", "0.171.0"), "claude": ("@anthropic-ai/claude-code", "2.1.197"),
            "qwen": ("@qwen-code/qwen-code", "0.15.10")}
CACHE = Path(os.environ.get("QWEN_SERVE_AGENTS_DIR", "~/.cache/qwen-serve/agents")).expanduser()
README = Path(__file__).parents[2] / "README.md"
README_URL, README_MODEL = "http://127.0.0.1:8000", "SmolLM2-135M-Instruct"


def installed_version(package: str) -> str | None:
    manifest = CACHE / "node_modules" / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.is_file() else None


def ensure_agents() -> dict[str, Path]:
    """Each agent's executable, installed with npm (into ``CACHE``) unless the pinned version is there."""
    if any(installed_version(package) != version for package, version in PACKAGES.values()):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("the coding-agent tests need npm (Node.js 20 or newer)")
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "package.json").write_text(json.dumps({"private": True, "dependencies": {
            package: version for package, version in PACKAGES.values()}}, indent=2))
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel", "error", "--prefix", str(CACHE)],
                       check=True, capture_output=True, timeout=900)
    return {name: CACHE / "node_modules" / ".bin" / name for name in PACKAGES}


def readme_block(tag: str, url: str, model: str) -> str:
    """README's block fenced as ```<lang> <tag>```, for a server at ``url`` serving ``model``."""
    found = re.search(rf"```\w+ {re.escape(tag)}\n(.*?)```", README.read_text(), flags=re.S)
    if found is None:
        raise LookupError(f"README has no block tagged {tag}")
    return found.group(1).replace(README_URL, url).replace(README_MODEL, model)


def exported(block: str) -> dict[str, str]:
    """The ``export NAME=value`` lines of a shell block."""
    return dict(re.findall(r"^export (\w+)=(\S+)$", block, flags=re.M))


if __name__ == "__main__":
    for name, path in ensure_agents().items():
        print(f"{name}: {path}")
