"""The wheels the image's build stage takes (``docker/install.sh``: ``docker/requirements.lock``, the build backend,
pip itself; ``qwen-serve-assets``: the wheels the embedded assets ship in), kept in a cache directory so that the
image-steps test runs without a network: ``python -m tests.deploy.wheelhouse`` fills it, as ``make install``
does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from engine.weights.embedded import ALL_ASSETS

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "docker" / "requirements.lock"
INSTALL = ROOT / "docker" / "install.sh"
WHEELHOUSE = Path(os.environ.get("QWEN_SERVE_WHEELHOUSE", "~/.cache/qwen-serve/wheelhouse")).expanduser()
STAMP = WHEELHOUSE / ".complete"


def requirements() -> list[str]:
    """pip as install.sh pins it and the project's build backend (the lock holds the rest)."""
    pip = re.search(r'"(pip==[^"]+)"', INSTALL.read_text())
    assert pip is not None, "install.sh pins pip"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return [pip.group(1), *build]


def offline_env() -> dict[str, str]:
    """pip settings that install from the wheelhouse alone (``make install`` must have filled it)."""
    assert STAMP.is_file(), f"no wheelhouse at {WHEELHOUSE}: run `make install` (python -m tests.deploy.wheelhouse)"
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE)}


def fill() -> None:
    """Download every wheel install.sh needs (a no-op when the lock has not changed since the last fill)."""
    assets = [asset.requirement for asset in ALL_ASSETS]
    digest = LOCK.read_text() + "\n".join([*requirements(), *assets])
    if STAMP.is_file() and STAMP.read_text() == digest:
        return
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "-qq", "--only-binary", ":all:", "--dest", str(WHEELHOUSE)]
    subprocess.run([*download, "-r", str(LOCK), *requirements()], check=True)
    subprocess.run([*download, "--no-deps", *assets], check=True)
    STAMP.write_text(digest)


if __name__ == "__main__":
    fill()
