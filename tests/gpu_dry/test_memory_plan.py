"""The memory plan of real model configs on a simulated CUDA card, against byte counts worked out here from the
shapes, and the packed layout read from the built modules themselves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.device import simulated_capability
from engine.dry_run import STAND_IN, fake_model, plan_memory, simulated_cuda
from engine.layers import CudaInt4Linear, DenseLinear, TritonInt4Linear
from engine.weights.int4 import CUDA_INNER_K_TILES, CUDA_INT4, TRITON_INT4
from engine.weights.loader import int4_kernel_for
from tests.gpu_dry.conftest import CONFIGS, model_config, raw_config


def dense_parameters(name: str) -> int:
    """Every weight of the checkpoint, counted from its config."""
    c = model_config(name)
    h, inner, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    per_layer = h * (q + 2 * kv) + (q + 2 * kv) * c.qkv_bias + q * h + 3 * inner * h + 2 * h
    heads = 1 if c.tie_word_embeddings else 2
    return heads * c.vocab_size * h + c.num_layers * per_layer + h


@pytest.mark.parametrize("name", ["qwen-7b-chat", "qwen2-7b-instruct"])
def test_bf16_plans_count_every_weight_at_two_bytes(name):
    plan = plan_memory(CONFIGS / name)
    c = model_config(name)
    assert plan.dtype == torch.bfloat16 and plan.weights_bytes == 2 * dense_parameters(name)
    assert plan.kv_bytes_per_token == c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    assert set(plan.modules.values()) >= {"DenseLinear"}


@pytest.mark.parametrize("name", ["qwen-7b-chat-int4", "qwen-7b-chat-awq"])
def test_int4_plans_stay_under_6_gb(name):
    """Qwen-7B-Chat-Int4 and its AWQ form: 4-bit layers (half a byte a weight, plus a bf16 scale and offset per
    128), embedding and head at bf16."""
    plan = plan_memory(CONFIGS / name)
    c = model_config(name)
    matrices = c.num_layers * (c.hidden_size * 4 * c.hidden_size + 3 * c.intermediate_size * c.hidden_size)
    rest = dense_parameters(name) - matrices
    assert plan.weights_bytes == matrices // 2 + matrices // 128 * 4 + 2 * rest
    assert plan.weights_bytes <= 6e9
    assert plan.modules["mlp gate/up"] == plan.modules["attention qkv"] == "CudaInt4Linear"


def test_a_simulated_load_keeps_every_4bit_matrix_packed():
    """Read from the modules themselves: every layer's four linears hold tinygemm's tiled int32 layout of
    out x in / 2 bytes and bf16 scales with offsets per group; nothing 4-bit was expanded."""
    config = model_config("qwen-7b-chat-int4")
    with simulated_cuda((9, 0)):
        model = fake_model(config, dtype=torch.bfloat16, quantization=raw_config("qwen-7b-chat-int4")
                           ["quantization_config"])
        for layer in model.layers:
            for linear in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
                assert isinstance(linear, CudaInt4Linear)
                out_features, in_features = linear.out_features, linear.scales_and_zeros.shape[0] * 128
                assert linear.packed.dtype == torch.int32 and linear.packed.device == STAND_IN
                assert linear.packed.shape == (out_features // 8, in_features // (16 * CUDA_INNER_K_TILES), 32,
                                               CUDA_INNER_K_TILES // 2)
                assert linear.packed.numel() * 4 == out_features * in_features // 2
                assert linear.scales_and_zeros.shape == (in_features // 128, out_features, 2)
                assert linear.scales_and_zeros.dtype == torch.bfloat16
        assert not any(isinstance(m, DenseLinear) for m in model.layers.modules())


def test_a_card_before_ampere_gets_fp16_and_no_tinygemm():
    """sm75 (T4): bf16 is emulated there, so fp16; tinygemm needs sm80, so 4-bit layers run on the Triton kernel
    (fp16) where Triton imports, else load dense."""
    plan = plan_memory(CONFIGS / "qwen-7b-chat-int4", capability=(7, 5))
    assert plan.dtype == torch.float16
    assert plan.modules["mlp down"] in ("TritonInt4Linear", "DenseLinear")
    assert plan.modules["mlp down"] == TritonInt4Linear.__name__ or plan.weights_bytes > 14e9


def test_the_command_prints_the_plan_and_exits_0():
    folder = CONFIGS / "qwen-7b-chat-int4"
    result = subprocess.run([sys.executable, "-m", "server.cli", "--dry-run", "--model", str(folder), "--device",
                             "cuda", "--kv-cache-memory", "8GiB"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert int(lines["weights_bytes"]) == plan_memory(folder).weights_bytes
    assert lines["kv_cache"].startswith("8.00 GiB: 2 sequences at 8192 tokens")


def test_the_command_refuses_a_cpu_plan_and_a_missing_folder(tmp_path):
    for extra in (["--model", str(CONFIGS / "qwen-7b-chat"), "--device", "cpu"], ["--model", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "server.cli", "--dry-run", *extra], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1 and "--dry-run" in result.stderr


def test_a_qwen3_moe_plan_counts_every_expert_and_runs_decode_eagerly():
    """Qwen3-30B-A3B: 128 experts a layer, each a SwiGLU 768 wide, a router, per-head q/k norms; ~30.5B weights
    at bf16; its decode steps read expert groups on the host, so no CUDA graphs."""
    plan = plan_memory(CONFIGS / "qwen3-30b-a3b")
    c = model_config("qwen3-30b-a3b")
    h, q, kv, experts = c.hidden_size, c.q_size, c.kv_size, c.num_experts
    per_layer = h * (q + 2 * kv) + q * h + 2 * c.head_dim + experts * h + experts * 3 * c.moe_intermediate_size * h
    parameters = 2 * c.vocab_size * h + c.num_layers * (per_layer + 2 * h) + h
    assert plan.weights_bytes == 2 * parameters and 30e9 < parameters < 31e9
    assert plan.modules["mlp"] == "SparseMoE: 128 experts, 8 per token"
    assert plan.modules["decode attention"] == "TritonPagedAttention, eager (routed experts)"


def test_an_act_order_plan_keeps_the_layers_packed_behind_their_input_orders(tmp_path):
    """GPTQ act-order (desc_act): the same 4-bit layers, each behind the gather into its sorted input order; one
    int64 order per layer and input (q/k/v share one, gate/up another) on top of the Int4 plan."""
    raw = raw_config("qwen-7b-chat-int4")
    raw["quantization_config"]["desc_act"] = True
    (tmp_path / "act-order").mkdir()
    (tmp_path / "act-order" / "config.json").write_text(json.dumps(raw))
    plan, contiguous = plan_memory(tmp_path / "act-order"), plan_memory(CONFIGS / "qwen-7b-chat-int4")
    c = model_config("qwen-7b-chat-int4")
    assert plan.modules["attention qkv"] == plan.modules["mlp down"] == "ReorderedInputs(CudaInt4Linear)"
    orders = c.num_layers * (3 * c.hidden_size + c.intermediate_size) * 8
    assert plan.weights_bytes == contiguous.weights_bytes + orders


def test_the_cuda_int4_kernel_is_tinygemm_unless_asked_for_and_refused_where_it_cannot_run():
    cuda = torch.device("cuda")
    with simulated_capability((9, 0)):
        assert int4_kernel_for(cuda, torch.bfloat16) == CUDA_INT4
        assert int4_kernel_for(cuda, torch.bfloat16, cuda_kernel="triton") == TRITON_INT4
        assert int4_kernel_for(cuda, torch.float16, cuda_kernel="auto") == TRITON_INT4
        with pytest.raises(ValueError, match="tinygemm needs bf16"):
            int4_kernel_for(cuda, torch.float16, cuda_kernel="tinygemm")
        with pytest.raises(ValueError, match="unknown cuda_int4_kernel"):
            int4_kernel_for(cuda, torch.bfloat16, cuda_kernel="marlin")
    with simulated_capability((7, 5)), pytest.raises(ValueError, match=r"sm80 \(Ampere\)"):
        int4_kernel_for(cuda, torch.bfloat16, cuda_kernel="tinygemm")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_an_8bit_cache_plan_counts_a_byte_and_a_scale_per_element_row(kv_cache_dtype):
    """Qwen2-7B with an 8-bit cache: per layer, k and v, KV head, D bytes and one fp32 scale (132 bytes against 256
    at bf16), so the same budget seats 1.9x the sequences."""
    c = model_config("qwen2-7b-instruct")
    budget = 20 << 30
    plan = plan_memory(CONFIGS / "qwen2-7b-instruct", kv_cache_memory=budget, kv_cache_dtype=kv_cache_dtype)
    bf16 = plan_memory(CONFIGS / "qwen2-7b-instruct", kv_cache_memory=budget)
    assert plan.kv_bytes_per_token == c.num_layers * 2 * c.num_kv_heads * (c.head_dim + 4)
    assert plan.seats is not None and bf16.seats is not None and plan.seats >= 1.9 * bf16.seats - 1
    assert f"kv_cache_dtype: {kv_cache_dtype}" in plan.lines()


def test_an_fp8_cache_plan_is_refused_before_ada_and_the_triton_kernels_are_planned_when_asked_for():
    with pytest.raises(ValueError, match="fp8 needs sm89"):
        plan_memory(CONFIGS / "qwen2-7b-instruct", kv_cache_dtype="fp8", capability=(8, 0))
    plan = plan_memory(CONFIGS / "qwen-7b-chat-int4", cuda_int4_kernel="triton")
    assert plan.modules["attention qkv"] == plan.modules["mlp down"] == TritonInt4Linear.__name__
    assert plan.weights_bytes <= 6e9


def test_a_hybrid_plan_counts_both_layer_kinds_and_the_state_cache():
    """Qwen3.5-shaped (transformers' defaults: 24 Gated DeltaNet layers and 8 gated-attention layers): keys and
    values for the attention layers only, and each sequence's linear-layer states (a conv window and a
    [value heads, key dim, value dim] matrix per linear layer, fp32) for every seat, the prompt passes and the
    snapshots."""
    plan = plan_memory(CONFIGS / "qwen3.5-defaults", max_num_seqs=8, state_snapshots=4)
    c = model_config("qwen3.5-defaults")
    h, q, kv, inner = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    conv, value = c.linear_conv_dim, c.linear_value_heads * c.linear_value_dim
    attention = h * (2 * q + 2 * kv) + q * h + 2 * c.head_dim
    linear = h * (conv + value + 2 * c.linear_value_heads) + c.linear_value_heads + c.linear_value_dim + value * h
    fp32 = len(c.linear_layers) * (c.linear_value_heads + conv * c.linear_conv_kernel) * 4  # decay rates, conv taps
    layers = len(c.linear_layers) * linear + c.num_attention_layers * attention + c.num_layers * (3 * inner * h + 2 * h)
    assert plan.weights_bytes == 2 * (2 * c.vocab_size * h + layers + h) + fp32
    assert (len(c.linear_layers), c.num_attention_layers) == (24, 8)
    assert plan.kv_bytes_per_token == 8 * 2 * c.num_kv_heads * c.head_dim * 2
    per_sequence = 24 * 4 * ((c.linear_conv_kernel - 1) * conv + c.linear_value_heads * c.linear_key_dim *
                             c.linear_value_dim)  # fp32
    assert (plan.state_bytes_per_sequence, plan.state_slots) == (per_sequence, 8 + 1 + 4)
    assert plan.modules["decode attention"] == "TritonPagedAttention, eager (linear-attention states)"
    assert plan.modules["linear attention"].endswith(", Triton recurrence")
    assert plan.lines()[-1] == f"state_cache: 13 slots (seats, drafted tokens' states, prompt passes, prefix " \
        f"snapshots), " \
        f"{13 * per_sequence / 2**30:.2f} GiB"


def test_a_drafting_plan_counts_the_block_its_keys_and_its_state_slots(tmp_path):
    """Qwen3.5's defaults with a multi-token-prediction block, drafting 2 tokens a step: the block's weights (its
    fc, one attention layer and MLP, three norms), one more attention layer's keys and values a token, and three
    state slots a seat (the state after each drafted token)."""
    raw = json.loads((CONFIGS / "qwen3.5-defaults" / "config.json").read_text())
    raw["text_config"]["mtp_num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    plain = plan_memory(tmp_path, max_num_seqs=8, state_snapshots=4)
    plan = plan_memory(tmp_path, max_num_seqs=8, state_snapshots=4, speculative_tokens=2)
    c = model_config("qwen3.5-defaults")
    h, q, kv, inner = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    attention = h * (2 * q + 2 * kv) + q * h + 2 * c.head_dim
    assert plan.weights_bytes - plain.weights_bytes == 2 * (2 * h * h + attention + 3 * inner * h + 5 * h)
    assert plan.kv_bytes_per_token == plain.kv_bytes_per_token * 9 // 8
    assert (plain.state_slots, plan.state_slots) == (8 + 1 + 4, 8 * 3 + 1 + 4)
    assert plan.modules["speculative decoding"].startswith("the multi-token-prediction block drafts 2 tokens")
    with pytest.raises(ValueError, match="multi-token-prediction"):
        plan_memory(CONFIGS / "qwen3.5-defaults", speculative_tokens=2)
