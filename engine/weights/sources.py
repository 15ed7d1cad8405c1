"""Where tensors come from: safetensors checkpoints (single or sharded) and GGUF files, under one interface."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from engine.kernels.gguf_matmul import StoredMatrix
from engine.weights.gguf_tensors import GGUFTensors
from engine.weights.int4 import Int4Weight


class WeightSource(Protocol):
    def __contains__(self, name: str) -> bool: ...

    def dense(self, name: str) -> torch.Tensor: ...

    def dense_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices ``start``..``stop`` along ``dim`` of ``dense(name)`` (tensor parallelism: a rank's slice)."""
        ...

    def int4(self, name: str) -> Int4Weight | None:
        """The tensor kept 4-bit when the checkpoint stores it so, else None."""

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tensor kept 8-bit (values, scale per block of 32) when the checkpoint stores it so, else None."""

    def stored(self, name: str) -> StoredMatrix | None:
        """A quantized GGUF matrix as the file stores it, else None."""


class SafetensorsSource:
    """A folder with ``model.safetensors`` or ``*.safetensors`` shards (with or without an index)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        self._handles = {name: safe_open(folder / name, framework="pt") for name in files}
        if not weight_map:
            weight_map = {key: name for name, handle in self._handles.items() for key in handle.keys()}  # noqa: SIM118
        self._where = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dense(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def dense_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim`` 0) or columns (1) ``start``..``stop``, reading only what they cover from the file."""
        view = self._handles[self._where[name]].get_slice(name)
        return view[start:stop] if dim == 0 else view[:, start:stop]

    def int4(self, name: str) -> Int4Weight | None:
        return None

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def stored(self, name: str) -> StoredMatrix | None:
        return None


class GGUFSource:
    """A ``.gguf`` file: quantized matrices can stay as stored (native kernels) or 4-bit (Q4_0/Q4_1, other int4
kernels); everything else is dequantized."""

    def __init__(self, tensors: GGUFTensors) -> None:
        self._tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def dense(self, name: str) -> torch.Tensor:
        return self._tensors.dense(name)

    def dense_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.dense(name).narrow(dim, start, stop - start).clone()  # a GGUF tensor dequantizes whole

    def int4(self, name: str) -> Int4Weight | None:
        return self._tensors.int4(name) if self._tensors.is_int4(name) else None

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._tensors.int8(name)

    def stored(self, name: str) -> StoredMatrix | None:
        return self._tensors.stored(name)


# Canonical parts of a decoder and their names in each checkpoint layout ({i}: layer index, {j}: expert index).
QWEN1_NAMES = {
    "embed": "transformer.wte.weight", "final_norm": "transformer.ln_f.weight", "lm_head": "lm_head.weight",
    "attn_norm": "transformer.h.{i}.ln_1.weight", "mlp_norm": "transformer.h.{i}.ln_2.weight",
    "qkv": "transformer.h.{i}.attn.c_attn.weight", "qkv_bias": "transformer.h.{i}.attn.c_attn.bias",
    "o": "transformer.h.{i}.attn.c_proj.weight",
    "gate": "transformer.h.{i}.mlp.w2.weight", "up": "transformer.h.{i}.mlp.w1.weight",
    "down": "transformer.h.{i}.mlp.c_proj.weight",
}
HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    **{p: f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"{p}_bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"},
    **{p: f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight", "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "router": "model.layers.{i}.mlp.gate.weight",
    **{f"expert_{p}": f"model.layers.{{i}}.mlp.experts.{{j}}.{p}_proj.weight" for p in ("gate", "up", "down")},
    **{f"shared_{p}": f"model.layers.{{i}}.mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
    "shared_expert_gate": "model.layers.{i}.mlp.shared_expert_gate.weight",
    **{f"lin_{p}": f"model.layers.{{i}}.linear_attn.in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")},
    "lin_conv": "model.layers.{i}.linear_attn.conv1d.weight", "lin_a_log": "model.layers.{i}.linear_attn.A_log",
    "lin_dt_bias": "model.layers.{i}.linear_attn.dt_bias", "lin_norm": "model.layers.{i}.linear_attn.norm.weight",
    "lin_out": "model.layers.{i}.linear_attn.out_proj.weight",
    # the multi-token-prediction block: its own decoder layer (``mtp.layers.0.``, as the model's layers) and these
    "mtp_fc": "mtp.fc.weight", "mtp_embed_norm": "mtp.pre_fc_norm_embedding.weight",
    "mtp_hidden_norm": "mtp.pre_fc_norm_hidden.weight", "mtp_norm": "mtp.norm.weight",
}


def drafting_layer_names(names: dict[str, str]) -> dict[str, str]:
    """``names`` with a folder's layer parts renamed to the multi-token-prediction block's own layer
    (``mtp.layers.{i}.``, the language model's prefix of a multimodal layout dropped)."""
    return {part: re.sub(r"^model\.(language_model\.)?layers\.", "mtp.layers.", name) for part, name in names.items()}


# Qwen3-Next stores the linear layers' input projections in two matrices, grouped per key head.
QWEN3_NEXT_NAMES = {**{k: v for k, v in HF_NAMES.items() if k not in ("lin_qkv", "lin_z", "lin_b", "lin_a")},
                    **{f"lin_{p}": f"model.layers.{{i}}.linear_attn.in_proj_{p}.weight" for p in ("qkvz", "ba")}}
GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    **{p: f"blk.{{i}}.attn_{p}.weight" for p in "qkv"}, "o": "blk.{i}.attn_output.weight",
    **{f"{p}_bias": f"blk.{{i}}.attn_{p}.bias" for p in "qkv"},
    **{p: f"blk.{{i}}.ffn_{p}.weight" for p in ("gate", "up", "down")},
    "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight",
    "router": "blk.{i}.ffn_gate_inp.weight",  # experts stacked in one tensor per part ({j} absent): [E, out, in]
    **{f"expert_{p}": f"blk.{{i}}.ffn_{p}_exps.weight" for p in ("gate", "up", "down")},
}
# llama.cpp's hybrid Qwen files: norms stored as 1 + weight, the decay rate as -exp(A_log), the linear layers'
# queries, keys and values in one matrix, the output gate z apart; b and a apart (Qwen3.5) or grouped per key head.
GGUF_HYBRID_NAMES = {
    **GGUF_NAMES, "mlp_norm": "blk.{i}.post_attention_norm.weight",
    **{f"shared_{p}": f"blk.{{i}}.ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
    "shared_expert_gate": "blk.{i}.ffn_gate_inp_shexp.weight",
    "lin_qkv": "blk.{i}.attn_qkv.weight", "lin_z": "blk.{i}.attn_gate.weight", "lin_b": "blk.{i}.ssm_beta.weight",
    "lin_a": "blk.{i}.ssm_alpha.weight", "lin_ba": "blk.{i}.ssm_ba.weight", "lin_conv": "blk.{i}.ssm_conv1d.weight",
    "lin_minus_a": "blk.{i}.ssm_a", "lin_dt_bias": "blk.{i}.ssm_dt.bias", "lin_norm": "blk.{i}.ssm_norm.weight",
    "lin_out": "blk.{i}.ssm_out.weight",
    # the multi-token-prediction block: one more block after the model's (a decoder layer's tensors) with these
    "mtp_fc": "blk.{i}.nextn.eh_proj.weight", "mtp_embed_norm": "blk.{i}.nextn.enorm.weight",
    "mtp_hidden_norm": "blk.{i}.nextn.hnorm.weight", "mtp_norm": "blk.{i}.nextn.shared_head_norm.weight",
}
