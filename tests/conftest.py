"""Shared fixtures: the real Qwen vocabulary and the embedded SmolLM2 model fetched by `make assets`. Without a GPU,
Triton kernels run under its interpreter: ``TRITON_INTERPRET`` is set here, before any test module imports Triton
(it reads the variable once, at import, and some torch modules import it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # the suite runs in several workers (`make test`: pytest -n 2): the cores shared out among them, so that their
    # compute threads do not contend (spinning OpenMP threads on a busy core slow both); servers the tests start
    # inherit it
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import torch  # after the thread count, which torch reads once

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.weights.embedded import QWEN_TIKTOKEN, SMOLLM2_GGUF, asset_path
from tokenizer import QwenTokenizer
from tokenizer.hf import HFTokenizer, load_gguf_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(relative: str) -> dict:
    return json.loads((FIXTURES / relative).read_text())


@pytest.fixture(scope="session")
def qwen_vocab_path() -> Path:
    return asset_path(QWEN_TIKTOKEN)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_vocab_path: Path) -> QwenTokenizer:
    return QwenTokenizer(qwen_vocab_path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return asset_path(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> HFTokenizer:
    return load_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf: Path):
    """transformers' own reading of the same GGUF vocabulary (the reference)."""
    import transformers  # a pinned test dependency: missing is a failure, not a skip

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_tokenizer_files(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer files, for checkpoints that need a vocabulary llama.cpp's converter knows."""
    import transformers

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name) \
        .save_pretrained(folder)
    return folder
