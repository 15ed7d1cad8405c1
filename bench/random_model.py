"""Random weights with a real model's shapes, built straight on the target device (no checkpoint needed):
for speed measurements where only the shapes matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.weights.builder import ModelBuilder
from engine.weights.int4 import Int4Weight
from engine.weights.loader import LoadedModel
from engine.weights.sources import QWEN1_NAMES

GROUP_SIZE = 128
# Qwen/Qwen-7B-Chat's config.json (the fields the engine reads).
QWEN_7B: dict[str, Any] = {
    "model_type": "qwen", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
    "intermediate_size": 22016, "vocab_size": 151936, "kv_channels": 128, "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 8192, "max_position_embeddings": 32768,
    "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False,
}


class RandomQwen1Source:
    """Qwen-1 tensor names with their shapes for ``config``; every tensor is drawn when the builder asks. With
    ``int4``, the layers' matrices come as 4-bit weights in groups of 128 (as Qwen-7B-Chat-Int4's GPTQ)."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype, int4: bool = False) -> None:
        h, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        self.device, self.dtype, self.quantized = device, dtype, int4
        self.shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, h),
                                                   "lm_head.weight": (vocab, h), "transformer.ln_f.weight": (h,)}
        for i in range(config.num_layers):
            p = f"transformer.h.{i}."
            self.shapes |= {p + "ln_1.weight": (h,), p + "ln_2.weight": (h,),
                            p + "attn.c_attn.weight": (3 * h, h), p + "attn.c_attn.bias": (3 * h,),
                            p + "attn.c_proj.weight": (h, h), p + "mlp.w1.weight": (inner, h),
                            p + "mlp.w2.weight": (inner, h), p + "mlp.c_proj.weight": (h, inner)}

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def dense(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        return torch.randn(shape, device=self.device, dtype=self.dtype) * shape[1] ** -0.5

    def int4(self, name: str) -> Int4Weight | None:
        shape = self.shapes[name]
        if not self.quantized or not name.startswith("transformer.h.") or len(shape) == 1:
            return None
        q = torch.randint(0, 16, shape, dtype=torch.uint8, device=self.device)
        scale = torch.rand(shape[0], shape[1] // GROUP_SIZE, device=self.device) * (4 / 15) * shape[1] ** -0.5
        return Int4Weight(q, scale, -8 * scale, GROUP_SIZE)

    def int8(self, name: str) -> None:
        return None


def random_qwen_7b(device: torch.device, dtype: torch.dtype, layers: int | None = None, *,
                   int4_kernel: str | None = None) -> LoadedModel:
    """Qwen-7B-Chat's shapes (``layers`` fewer for a quick run), random weights, no tokenizer; with ``int4_kernel``
    the layers' matrices are 4-bit and stay packed on that kernel."""
    raw = {**QWEN_7B, "num_hidden_layers": layers or QWEN_7B["num_hidden_layers"]}
    config = ModelConfig.from_hf(raw)
    source = RandomQwen1Source(config, device, dtype, int4=int4_kernel is not None)
    model = ModelBuilder(config, source, QWEN1_NAMES, dtype, device, int4_kernel=int4_kernel).build()
    return LoadedModel("qwen-7b-random", Path("."), config, model, None)
