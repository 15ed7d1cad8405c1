"""One ``ModelConfig`` for every supported architecture, from HF ``config.json`` or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HYBRID = ("qwen3_next", "qwen3_5", "qwen3_5_moe")  # Gated DeltaNet layers beside full attention
SUPPORTED = ("qwen", "qwen2", "qwen3", "qwen3_moe", "llama", *HYBRID)
TEXT_CONFIGS = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}  # text-only folders of Qwen3.5
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",  # GGUF name -> ours
              "qwen3next": "qwen3_next", "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only model (``intermediate_size`` is the width of one MLP branch)."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_model_len: int
    qkv_bias: bool
    tie_word_embeddings: bool
    # Qwen3: an RMSNorm over each head of q and of k, before RoPE.
    qk_norm: bool = False
    # Qwen3-MoE: routed experts (``num_experts`` > 0) in the sparse layers, each an MLP ``moe_intermediate_size``
    # wide; a token goes to its ``experts_per_token`` best, weighted by their router probabilities (renormalized
    # over the chosen ones when ``norm_topk_prob``).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Qwen-1 only: dynamic NTK rotary base and logN attention scaling, both driven by ``seq_length``.
    seq_length: int = 0
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    # Hybrid models (Qwen3-Next, Qwen3.5): ``linear_layers`` are Gated DeltaNet layers (a causal conv over
    # ``linear_conv_kernel`` tokens, then the gated delta rule over a [value heads, key dim, value dim] state), the
    # others full attention with a sigmoid output gate and RoPE over the first ``rotary_dim`` of each head; every
    # RMSNorm outside the linear layers scales by (1 + weight). Experts may add a gated shared expert.
    linear_layers: tuple[int, ...] = ()
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv_kernel: int = 0
    rotary_dim: int = 0  # 0: the whole head
    attn_output_gate: bool = False
    shared_expert_intermediate_size: int = 0
    # llama.cpp's Qwen3.5 files order value heads tiled over the key heads (head j reads key head j % key heads)
    # instead of grouped (j // (value heads / key heads)).
    linear_value_tiled: bool = False
    # Multi-token prediction (Qwen3-Next, Qwen3.5): blocks that draft the token after next from the last hidden
    # state and the next token's embedding, when the model is built with them (speculative decoding; the loader
    # sets it): each keeps keys and values in the paged cache like an attention layer.
    mtp_layers: int = 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def hybrid(self) -> bool:
        """Whether some layers keep a recurrent state instead of keys and values."""
        return bool(self.linear_layers)

    @property
    def num_attention_layers(self) -> int:
        """Layers that keep keys and values in the paged cache (a multi-token-prediction block's last)."""
        return self.num_layers - len(self.linear_layers) + self.mtp_layers

    @property
    def rotated_dim(self) -> int:
        """How much of each head RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of a linear layer's causal conv: its queries, keys and values."""
        return 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_heads * self.linear_value_dim

    def sparse_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is routed experts."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """From a ``config.json`` of model_type ``qwen`` (Qwen-1), ``qwen2``, ``qwen3``, ``qwen3_moe``, ``llama`` or
        a hybrid one (``qwen3_next``, ``qwen3_5``, ``qwen3_5_moe``, their ``_text`` forms)."""
        model_type = config.get("model_type")
        if model_type == "qwen":
            return cls._from_qwen1(config)
        if model_type in ("qwen3_5", "qwen3_5_moe") and "text_config" in config:  # the multimodal layout
            config = {**config["text_config"], "model_type": model_type}
        model_type = TEXT_CONFIGS.get(model_type, model_type)
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
        rope_scaling = config.get("rope_scaling") or {}
        if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope_scaling {rope_scaling}")
        heads = config["num_attention_heads"]
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        fields = dict(
            arch=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"] if model_type != "qwen3_5_moe"
            else config.get("intermediate_size") or 0,  # Qwen3.5-MoE's layers are all experts
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=float(rope_theta),
            max_model_len=config.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", *HYBRID),
            num_experts=config.get("num_experts") or config.get("num_local_experts") or 0
            if model_type in ("qwen3_moe", "qwen3_next", "qwen3_5_moe") else 0,
            experts_per_token=config.get("num_experts_per_tok", 0),
            moe_intermediate_size=config.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(config.get("norm_topk_prob", True)),  # Qwen3.5-MoE always renormalizes
            decoder_sparse_step=config.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(config.get("mlp_only_layers") or ()),
        )
        if model_type in HYBRID:
            fields |= cls._hybrid_fields(config, fields["head_dim"], has_experts=bool(fields["num_experts"]))
        return cls(**fields)

    @staticmethod
    def _hybrid_fields(config: dict[str, Any], head_dim: int, has_experts: bool) -> dict[str, Any]:
        """What Qwen3-Next and Qwen3.5 add: ``layer_types`` name each layer's kind, the linear layers' shapes,
        partial rotary, the attention output gate and a shared expert."""
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_parameters {rope}")
        layers = config["num_hidden_layers"]
        kinds = config.get("layer_types") or [
            "full_attention" if (i + 1) % config.get("full_attention_interval", 4) == 0 else "linear_attention"
            for i in range(layers)]
        if set(kinds) - {"full_attention", "linear_attention"} or len(kinds) != layers:
            raise ValueError(f"unsupported layer_types {kinds}")
        return dict(
            linear_layers=tuple(i for i, kind in enumerate(kinds) if kind == "linear_attention"),
            linear_key_heads=config["linear_num_key_heads"],
            linear_value_heads=config["linear_num_value_heads"],
            linear_key_dim=config["linear_key_head_dim"],
            linear_value_dim=config["linear_value_head_dim"],
            linear_conv_kernel=config["linear_conv_kernel_dim"],
            rotary_dim=int(head_dim * rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))),
            attn_output_gate=bool(config.get("attn_output_gate", True)),
            shared_expert_intermediate_size=(config.get("shared_expert_intermediate_size") or 0) if has_experts else 0,
        )

    @classmethod
    def _from_qwen1(cls, config: dict[str, Any]) -> ModelConfig:
        if config.get("rotary_pct", 1.0) != 1.0:
            raise ValueError("Qwen-1 with rotary_pct != 1 is not supported")
        heads = config["num_attention_heads"]
        seq_length = config.get("seq_length", 2048)
        dynamic_ntk = bool(config.get("use_dynamic_ntk", False))
        return cls(
            arch="qwen",
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=config.get("kv_channels") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"] // 2,
            rms_norm_eps=config.get("layer_norm_epsilon", 1e-6),
            rope_theta=float(config.get("rotary_emb_base", 10000)),
            max_model_len=config.get("max_position_embeddings", seq_length) if dynamic_ntk else seq_length,
            qkv_bias=True,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            seq_length=seq_length,
            use_dynamic_ntk=dynamic_ntk,
            use_logn_attn=bool(config.get("use_logn_attn", False)),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], has_output_weight: bool,
                  mlp_only_layers: tuple[int, ...] = ()) -> ModelConfig:
        """From GGUF metadata (architectures ``llama``, ``qwen2``, ``qwen3`` and ``qwen3moe``); ``mlp_only_layers``:
        the layers of an expert model that store a dense MLP instead (the file's tensors tell)."""
        arch = metadata["general.architecture"]
        if arch not in GGUF_ARCHS:
            raise ValueError(f"unsupported GGUF architecture {arch!r}")

        def key(name: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{name}", default)

        heads = key("attention.head_count")
        hidden = key("embedding_length")
        layers = key("block_count") - key("nextn_predict_layers", 0)  # multi-token-prediction blocks come last
        hybrid = {}
        if arch in ("qwen3next", "qwen35", "qwen35moe"):
            head_dim = key("attention.key_length") or hidden // heads
            value_heads = key("ssm.time_step_rank")
            hybrid = dict(
                linear_layers=tuple(i for i, recurrent in enumerate(key("attention.recurrent_layers")[:layers])
                                    if recurrent),
                linear_key_heads=key("ssm.group_count"), linear_value_heads=value_heads,
                linear_key_dim=key("ssm.state_size"), linear_value_dim=key("ssm.inner_size") // value_heads,
                linear_conv_kernel=key("ssm.conv_kernel"), rotary_dim=key("rope.dimension_count") or head_dim,
                attn_output_gate=True,
                shared_expert_intermediate_size=key("expert_shared_feed_forward_length", 0),
                linear_value_tiled=arch != "qwen3next")
        return cls(
            arch=GGUF_ARCHS[arch],
            vocab_size=key("vocab_size") or len(metadata["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=key("attention.head_count_kv", heads),
            head_dim=key("attention.key_length") or hidden // heads,
            intermediate_size=key("feed_forward_length", 0),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_model_len=key("context_length", 2048),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings=not has_output_weight,
            qk_norm=arch in ("qwen3", "qwen3moe") or bool(hybrid),
            num_experts=key("expert_count", 0),
            experts_per_token=key("expert_used_count", 0),
            moe_intermediate_size=key("expert_feed_forward_length", 0),
            norm_topk_prob=bool(key("expert_weights_norm", True)),  # llama.cpp renormalizes Qwen3-MoE's by default
            mlp_only_layers=mlp_only_layers,
            **hybrid,
        )
