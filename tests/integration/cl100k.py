"""OpenAI's ``cl100k_base`` vocabulary file, which LangChain's ``OpenAIEmbeddings`` tokenizes with by default, kept
in a cache directory for tiktoken (``TIKTOKEN_CACHE_DIR``) so that the test of that default runs without a network.
tiktoken downloads it from OpenAI's blob storage, which is not a package registry; the one registry copy is the file
litellm ships for the same purpose, taken from its pinned wheel and checked against the hash tiktoken itself expects
(``python -m tests.integration.cl100k`` fetches it ahead, as ``make install`` does)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LITELLM = "litellm==1.110.2"
URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken_ext.openai_public's
CACHE = Path(os.environ.get("QWEN_SERVE_TIKTOKEN_DIR", "~/.cache/qwen-serve/tiktoken")).expanduser()
CACHED_NAME = hashlib.sha1(URL.encode()).hexdigest()  # the name tiktoken looks for in its cache directory


def ensure_cl100k() -> Path:
    """The cache directory holding the checked vocabulary file (downloaded with pip unless it is there)."""
    target = CACHE / CACHED_NAME
    if target.is_file():
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "--dest", download, LITELLM], check=True, timeout=900)
        wheel = next(Path(download).glob("litellm-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(f"litellm/litellm_core_utils/tokenizers/{CACHED_NAME}")
        if hashlib.sha256(data).hexdigest() != SHA256:
            raise RuntimeError(f"cl100k_base from {wheel.name} does not match tiktoken's expected sha256")
        staged = Path(download) / CACHED_NAME
        staged.write_bytes(data)
        staged.replace(target)
    return CACHE


if __name__ == "__main__":
    ensure_cl100k()
