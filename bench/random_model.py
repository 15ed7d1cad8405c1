"""Random weights with a real model's shapes, built straight on the target device (no checkpoint needed):
for speed measurements where only the shapes matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.weights.builder import ModelBuilder
from engine.weights.loader import LoadedModel
from engine.weights.shapes import ShapeSource
from engine.weights.sources import QWEN1_NAMES

GROUP_SIZE = 128
# Qwen/Qwen-7B-Chat's config.json (the fields the engine reads).
QWEN_7B: dict[str, Any] = {
    "model_type": "qwen", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
    "intermediate_size": 22016, "vocab_size": 151936, "kv_channels": 128, "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 8192, "max_position_embeddings": 32768,
    "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False,
}


def random_fill(what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Norms of ones, matrices of unit-variance outputs; 4-bit values uniform, with scales and offsets that keep
    those outputs near unit variance too (w = (q - 8) * scale)."""
    if what == "int4.q":
        return torch.randint(0, 16, shape, dtype=dtype, device=device)
    if what == "int4.order":
        return torch.randperm(shape[0], device=device)
    if what in ("int4.scale", "int4.offset"):
        scale = torch.rand(shape, device=device) * (4 / 15) / (shape[1] * GROUP_SIZE) ** 0.5
        return scale if what == "int4.scale" else -8 * scale
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.randn(shape, device=device, dtype=dtype) * shape[1] ** -0.5


def random_qwen_7b(device: torch.device, dtype: torch.dtype, layers: int | None = None, *,
                   int4_kernel: str | None = None, act_order: bool = False) -> LoadedModel:
    """Qwen-7B-Chat's shapes (``layers`` fewer for a quick run), random weights, no tokenizer; with ``int4_kernel``
    the layers' matrices are 4-bit and stay packed on that kernel (``act_order``: with GPTQ act-order's input
    orders, random permutations)."""
    raw = {**QWEN_7B, "num_hidden_layers": layers or QWEN_7B["num_hidden_layers"]}
    config = ModelConfig.from_hf(raw)
    source = ShapeSource(config, QWEN1_NAMES, device, dtype, fill=random_fill,
                         int4_group_size=GROUP_SIZE if int4_kernel is not None else None, act_order=act_order)
    model = ModelBuilder(config, source, QWEN1_NAMES, dtype, device, int4_kernel=int4_kernel).build()
    return LoadedModel("qwen-7b-random", Path("."), config, model, None)
