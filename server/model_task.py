"""What a checkpoint is for, read from its files when ``--task`` and ``--pooling`` are ``auto``: a
sentence-transformers folder (``modules.json``, its ``1_Pooling/config.json``) is an embedding model with that
pooling; a GGUF file's ``<architecture>.pooling_type`` (llama.cpp's numbering: 1 mean, 2 cls, 3 last, 4 rank) says
embed with that pooling, or rerank; anything else (hub ids included: resolved later) generates."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizer.gguf_metadata import read_gguf_metadata

GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}
GGUF_RANK = 4
SENTENCE_POOLING = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_cls_token": "cls"}


def checkpoint_task(model: str | None) -> tuple[str, str]:
    """The task and pooling the checkpoint at ``model`` declares."""
    path = Path(model).expanduser() if model else None
    if path is None or not path.exists():
        return "generate", "last"
    if path.suffix == ".gguf":
        metadata = read_gguf_metadata(path)
        kind = metadata.get(f"{metadata.get('general.architecture')}.pooling_type")
        if kind == GGUF_RANK:
            return "rerank", "last"
        return ("embed", GGUF_POOLING[kind]) if kind in GGUF_POOLING else ("generate", "last")
    if not (path / "modules.json").is_file():
        return "generate", "last"
    pooling = path / "1_Pooling" / "config.json"
    flags = json.loads(pooling.read_text()) if pooling.is_file() else {}
    return "embed", next((mode for key, mode in SENTENCE_POOLING.items() if flags.get(key)), "last")


def served_task(task: str, pooling: str, model: str | None) -> tuple[str, str]:
    """``--task``/``--pooling`` as set, each ``auto`` one read from the checkpoint."""
    if task != "auto" and pooling != "auto":
        return task, pooling
    declared_task, declared_pooling = checkpoint_task(model)
    return (declared_task if task == "auto" else task), (declared_pooling if pooling == "auto" else pooling)
