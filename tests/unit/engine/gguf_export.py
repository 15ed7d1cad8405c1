"""A transformers checkpoint written as a GGUF file with the ``gguf`` library (llama.cpp's tensor names and
metadata keys), with a small byte-level vocabulary, so GGUF loading can be checked against the same weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tokenizers import pre_tokenizers

GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "llama": "llama"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "mlp.gate": "ffn_gate_inp"}


def vocabulary(size: int) -> list[str]:
    """The 256 byte-level symbols, then fillers up to ``size`` (the first filler is the merge of two spaces)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    return [*symbols, "ĠĠ", *(f"<filler_{i}>" for i in range(size - len(symbols) - 1))]


def llama_row_order(heads: int, head_dim: int) -> np.ndarray:
    """llama.cpp's q/k rows: stored row ``order[i]`` is the model's row i (the loader undoes it)."""
    return np.arange(heads * head_dim).reshape(heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def write_gguf(model, path: Path, raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None) -> Path:
    """``model`` (a transformers causal LM, fp32) as a GGUF file at ``path``; Qwen3-MoE experts stacked per part;
    llama's q/k rows in llama.cpp's order. ``raw``: tensors written as these blocks instead (GGUF names; already in
    the file's row order)."""
    config = model.config
    arch = GGUF_ARCH[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_weights_norm(config.norm_topk_prob)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocabulary(config.vocab_size))
    writer.add_token_types([gguf.TokenType.NORMAL] * config.vocab_size)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_eos_token_id(config.vocab_size - 1)
    for name, tensor in _tensors(model):
        if raw and name in raw:
            blocks, kind = raw[name]
            writer.add_tensor(name, blocks, raw_dtype=kind)
            continue
        values = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            values = values[np.argsort(llama_row_order(heads, head_dim))]
        writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(model):
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not model.config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{ours}.{kind}"
                if key in state:
                    yield f"blk.{i}.{theirs}.{kind}", state[key]
        experts = getattr(model.model.layers[i].mlp, "experts", None)
        if experts is not None:  # transformers holds them fused: gate_up [E, 2I, H], down [E, H, I]
            gate, up = experts.gate_up_proj.chunk(2, dim=1)
            yield f"blk.{i}.ffn_gate_exps.weight", gate
            yield f"blk.{i}.ffn_up_exps.weight", up
            yield f"blk.{i}.ffn_down_exps.weight", experts.down_proj
