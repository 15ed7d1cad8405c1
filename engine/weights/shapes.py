"""Every tensor a checkpoint of a ``ModelConfig`` holds, by name, without reading one: for dry runs, memory plans
and speed runs with random weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from engine.config import ModelConfig
from engine.weights.int4 import Int4Weight
from engine.weights.sources import drafting_layer_names

Fill = Callable[[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor]  # (what, shape, dtype, device)
MATRICES = ("qkv", "q", "k", "v", "o", "gate", "up", "down")  # the parts a 4-bit checkpoint stores 4-bit
INPUT_OF = {"qkv": "attention", "q": "attention", "k": "attention", "v": "attention", "o": "attention output",
            "gate": "mlp", "up": "mlp", "down": "mlp output"}  # matrices that read one input share its act-order
BIASES = ("qkv_bias", "q_bias", "k_bias", "v_bias")


def part_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each canonical part (``engine.weights.sources`` names) of ``config``."""
    h, inner, vocab, q, kv = (config.hidden_size, config.intermediate_size, config.vocab_size, config.q_size,
                              config.kv_size)
    gated_q = 2 * q if config.attn_output_gate else q  # q_proj also gives the output gate
    conv, value, value_heads = config.linear_conv_dim, config.linear_value_heads * config.linear_value_dim, \
        config.linear_value_heads
    shared = config.shared_expert_intermediate_size
    hybrid = {"lin_qkv": (conv, h), "lin_z": (value, h), "lin_b": (value_heads, h), "lin_a": (value_heads, h),
              "lin_qkvz": (conv + value, h), "lin_ba": (2 * value_heads, h),
              "lin_conv": (conv, 1, config.linear_conv_kernel), "lin_a_log": (value_heads,),
              "lin_dt_bias": (value_heads,), "lin_norm": (config.linear_value_dim,), "lin_out": (h, value),
              "shared_gate": (shared, h), "shared_up": (shared, h), "shared_down": (h, shared),
              "shared_expert_gate": (1, h)}
    return {"embed": (vocab, h), "lm_head": (vocab, h), "final_norm": (h,), "attn_norm": (h,), "mlp_norm": (h,),
            "qkv": (gated_q + 2 * kv, h), "qkv_bias": (q + 2 * kv,), "q": (gated_q, h), "k": (kv, h), "v": (kv, h),
            "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "o": (h, q), "gate": (inner, h), "up": (inner, h),
            "down": (h, inner), "q_norm": (config.head_dim,), "k_norm": (config.head_dim,),
            "router": (config.num_experts, h), "expert_gate": (config.moe_intermediate_size, h),
            "expert_up": (config.moe_intermediate_size, h), "expert_down": (h, config.moe_intermediate_size),
            "mtp_fc": (h, 2 * h), **{norm: (h,) for norm in DRAFTING_NORMS}, **(hybrid if config.hybrid else {})}


DRAFTING_NORMS = ("mtp_embed_norm", "mtp_hidden_norm", "mtp_norm")
MOE_PARTS = ("router", "expert_gate", "expert_up", "expert_down", "shared_gate", "shared_up", "shared_down",
             "shared_expert_gate")
ATTENTION_PARTS = ("qkv", "qkv_bias", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm")
DENSE_MLP_PARTS = ("gate", "up", "down")


def _layers_with(config: ModelConfig, part: str) -> list[int]:
    """The layers holding ``part``: routed-expert parts in the sparse layers, the dense MLP in the others; a hybrid
    model's linear-attention parts in its linear layers, attention parts in the others."""
    if part.startswith("lin_"):
        return list(config.linear_layers)
    if part in ATTENTION_PARTS:
        return [i for i in range(config.num_layers) if i not in config.linear_layers]
    if part in MOE_PARTS:
        return [i for i in range(config.num_layers) if config.sparse_layer(i)]
    if part in DENSE_MLP_PARTS:
        return [i for i in range(config.num_layers) if not config.sparse_layer(i)]
    return list(range(config.num_layers))


def empty(what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class ShapeSource:
    """A weight source for ``config`` under the checkpoint names ``names``, every tensor made by ``fill`` (what:
    a canonical part, or "int4.q", "int4.scale", "int4.offset"; shape, dtype, device) when the builder asks:
    uninitialized by default (on a fake or meta device nothing is allocated).
    With ``int4_group_size`` the layers' matrices come 4-bit (contiguous groups of that many inputs: 4-bit values as
    uint8, fp32 scales and offsets), as a GPTQ or AWQ checkpoint stores them; with ``act_order`` too, each with
    an input order (one per layer and input, shared by the matrices that read it, as GPTQ's act-order gives)."""

    def __init__(self, config: ModelConfig, names: dict[str, str], device: torch.device, dtype: torch.dtype, *,
                 int4_group_size: int | None = None, act_order: bool = False, fill: Fill = empty) -> None:
        self.device, self.dtype, self.group_size, self.fill = device, dtype, int4_group_size, fill
        self.act_order = act_order
        self.orders: dict[tuple[str, str], torch.Tensor] = {}
        self.shapes = part_shapes(config)
        skipped = set(BIASES) if not config.qkv_bias else set()
        if not config.qk_norm:
            skipped |= {"q_norm", "k_norm"}
        if config.tie_word_embeddings:
            skipped.add("lm_head")
        if not config.mtp_layers:
            skipped |= {"mtp_fc", *DRAFTING_NORMS}
        self.parts: dict[str, str] = {}
        experts = range(config.num_experts)
        for part, template in names.items():
            if part in skipped or part not in self.shapes:
                continue
            if part.startswith("expert_") and "{j}" not in template:  # every expert's in one tensor
                self.shapes[f"{part}.stacked"] = (config.num_experts, *self.shapes[part])
                part = f"{part}.stacked"
            layers = _layers_with(config, part.removesuffix(".stacked")) if "{i}" in template else [0]
            self.parts.update({template.format(i=i, j=j): part for i in layers
                               for j in (experts if "{j}" in template else [0])})
        if config.mtp_layers:  # the drafting block's layer: an attention layer, with layer 0's kind of MLP
            attention_only = dataclasses.replace(config, linear_layers=())
            for part, template in drafting_layer_names(names).items():
                if "{i}" in template and part in self.shapes and part not in skipped and \
                        0 in _layers_with(attention_only, part):
                    self.parts.update({template.format(i=0, j=j): part
                                       for j in (experts if "{j}" in template else [0])})

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def dense(self, name: str) -> torch.Tensor:
        part = self.parts[name]
        return self.fill(part, self.shapes[part], self.dtype, self.device)

    def dense_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        part = self.parts[name]
        shape = list(self.shapes[part])
        shape[dim] = stop - start
        return self.fill(part, tuple(shape), self.dtype, self.device)

    def int4(self, name: str) -> Int4Weight | None:
        part = self.parts[name]
        if self.group_size is None or part not in MATRICES:
            return None
        out_features, in_features = self.shapes[part]
        groups = (out_features, in_features // self.group_size)
        order = None
        if self.act_order:
            key = (name.rsplit(".", 2)[0], INPUT_OF[part])  # the module path above the matrix, and its input
            if key not in self.orders:
                self.orders[key] = self.fill("int4.order", (in_features,), torch.int64, self.device)
            order = self.orders[key]
        return Int4Weight(self.fill("int4.q", (out_features, in_features), torch.uint8, self.device),
                          self.fill("int4.scale", groups, torch.float32, self.device),
                          self.fill("int4.offset", groups, torch.float32, self.device), self.group_size, order)

    def int8(self, name: str) -> None:
        return None

    def stored(self, name: str) -> None:
        return None
