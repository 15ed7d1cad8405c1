"""One prefill and decode steps of the real engine code at Qwen-7B-Chat's and Qwen2-7B's shapes, for a simulated
CUDA card, on fake tensors: the CUDA-only kernels (the Triton paged decode, flash-attn's varlen) are stand-ins that
assert their calling contract and return a tensor of the right shape. A CPU tensor in the step, a host sync or a
data-dependent shape makes torch's fake tensors raise; a wrong kernel argument makes a stand-in raise. The last
tests inject each defect and check that the dry run fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.dry_run import STAND_IN, fake_model, simulated_cuda
from engine.model import VarlenLayout
from engine.runner import ModelRunner
from engine.weights.loader import LoadedModel
from tests.gpu_dry.conftest import model_config, raw_config

PROMPTS = [list(range(1, 101)), list(range(7, 44)), list(range(200, 217))]  # 100, 37 and 17 tokens
DECODE_STEPS = 3


def on_stand_in(*tensors: torch.Tensor) -> None:
    assert all(t.device == STAND_IN for t in tensors), [t.device for t in tensors]


class PagedDecodeContract:
    """The Triton paged-decode kernel's contract: [B, heads, D] queries in the cache's dtype (or an int8/fp8 cache
    with fp32 scales per slot and head), caches with unit stride in D, int32 block tables and key counts of B rows, all
    on the card."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.calls = 0

    def __call__(self, q, cache, block_tables, kv_lens) -> torch.Tensor:
        on_stand_in(q, cache.k, cache.v, block_tables, kv_lens)
        batch = q.shape[0]
        assert q.shape == (batch, self.heads, self.head_dim)
        if cache.quantized:
            assert cache.k.dtype == cache.v.dtype and cache.k.dtype in (torch.int8, torch.float8_e4m3fn)
            assert cache.k_scale.dtype == cache.v_scale.dtype == torch.float32
            assert cache.k_scale.shape == cache.k.shape[:2]
            on_stand_in(cache.k_scale, cache.v_scale)
        else:
            assert q.dtype == cache.k.dtype == cache.v.dtype
        assert cache.k.shape[1:] == (self.kv_heads, self.head_dim) and cache.k.stride(-1) == 1
        assert block_tables.dtype == kv_lens.dtype == torch.int32 and block_tables.is_contiguous()
        assert block_tables.shape[0] == kv_lens.shape[0] == batch and block_tables.dim() == 2
        self.calls += 1
        return q.new_empty((batch, self.heads * self.head_dim))


class RopeStoreContract:
    """The fused RoPE/cache-write kernel's contract: [N, (heads + 2 kv_heads) * D] q/k/v with unit feature stride,
    rotary factors [N, 1, D] and logN [N, 1, 1] in its dtype, int64 slots of N tokens, a cache in that dtype with keys
    and values laid out alike (or 8-bit with fp32 scales per slot and head), all on the card; it returns the
    queries [N, heads, D]."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.calls = 0

    def __call__(self, qkv, cos, sin, logn, slots, cache, q_norm, k_norm) -> torch.Tensor:
        tokens = qkv.shape[0]
        on_stand_in(qkv, cos, sin, slots, cache.k, cache.v, *([] if logn is None else [logn]))
        assert qkv.shape == (tokens, (self.heads + 2 * self.kv_heads) * self.head_dim) and qkv.stride(1) == 1
        assert cos.shape == sin.shape == (tokens, 1, self.head_dim) and cos.dtype == sin.dtype == qkv.dtype
        assert logn is None or (logn.shape == (tokens, 1, 1) and logn.dtype == qkv.dtype)
        assert slots.dtype == torch.int64 and slots.shape == (tokens,)
        if cache.quantized:
            assert cache.k.dtype == cache.v.dtype and cache.k.dtype in (torch.int8, torch.float8_e4m3fn)
            assert cache.k_scale.dtype == cache.v_scale.dtype == torch.float32
            assert cache.k_scale.stride() == cache.v_scale.stride() and cache.k_scale.shape == cache.k.shape[:2]
            on_stand_in(cache.k_scale, cache.v_scale)
        else:
            assert cache.k.dtype == cache.v.dtype == qkv.dtype
        assert cache.k.stride() == cache.v.stride() and cache.k.stride(-1) == 1
        assert (q_norm is None) == (k_norm is None)
        self.calls += 1
        return qkv.new_empty((tokens, self.heads, self.head_dim))


class VarlenContract:
    """flash-attn's ``flash_attn_varlen_func`` contract: fp16/bf16 q, k, v alike, contiguous, [tokens, heads, D];
    int32 offsets; on the card."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale,
                 causal) -> torch.Tensor:
        on_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k)
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        assert q.is_contiguous() and k.dim() == v.dim() == q.dim() == 3
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and causal
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        self.calls += 1
        return torch.empty_like(q)


@pytest.fixture(params=[("qwen-7b-chat", "auto"), ("qwen-7b-chat-int4", "auto"), ("qwen2-7b-instruct", "auto"),
                        ("qwen2-7b-instruct", "int8"), ("qwen2-7b-instruct", "fp8")], ids=lambda p: "-".join(p))
def card(request) -> Iterator[tuple[LLMEngine, PagedDecodeContract, RopeStoreContract]]:
    """The engine over the model built for an sm90 card (a KV cache in bf16 or int8), decode steps on the
    paged-decode contract, RoPE and the cache write on the fused kernel's."""
    name, kv_cache_dtype = request.param
    config = model_config(name)
    with simulated_cuda((9, 0)):
        model = fake_model(config, dtype=torch.bfloat16, quantization=raw_config(name).get("quantization_config"))
        engine = LLMEngine(LoadedModel(name, Path(name), config, model, None),
                           EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024, kv_cache_dtype=kv_cache_dtype))
        paged = PagedDecodeContract(config.num_heads, config.num_kv_heads, config.head_dim)
        model.use_paged_decode(lambda: paged)
        rope = RopeStoreContract(config.num_heads, config.num_kv_heads, config.head_dim)
        model.use_rope_store(lambda: rope)
        yield engine, paged, rope


def run_steps(engine: LLMEngine, steps: int = DECODE_STEPS) -> list[torch.Tensor]:
    """Prefill ``PROMPTS`` and decode ``steps`` tokens; the sampled token (the one host copy, left out here) is
    stood in by a fixed id."""
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), prompt, SamplingParams(max_tokens=steps + 1, temperature=0))
    logits = []
    for _ in range(steps + 1):
        batch = engine.scheduler.schedule()
        logits.append(engine.runner.run(batch))
        for seq in batch:
            seq.num_computed = len(seq)
            seq.output_ids.append(5)
    return logits


def test_prefill_and_decode_steps_run_on_the_card(card):
    engine, paged, rope = card
    logits = run_steps(engine)
    vocab = engine.model_config.vocab_size
    for step in logits:
        on_stand_in(step)
        assert step.shape == (len(PROMPTS), vocab) and step.dtype == torch.float32
    assert paged.calls == DECODE_STEPS * engine.model_config.num_layers  # every decode layer on the paged kernel
    assert engine.runner.kv_cache.data.device == STAND_IN
    assert engine.runner.kv_cache.data.dtype == {"auto": torch.bfloat16, "int8": torch.int8,
                                                 "fp8": torch.float8_e4m3fn}[engine.config.kv_cache_dtype]
    assert rope.calls == (DECODE_STEPS + 1) * engine.model_config.num_layers  # every step's keys, 8-bit caches too


def test_an_fp8_cache_is_refused_before_ada():
    """sm80 (A100) has no fp8 conversions: the engine refuses at start, naming the way out."""
    config = model_config("qwen2-7b-instruct")
    with simulated_cuda((8, 0)):
        model = fake_model(config, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"fp8 needs .* \(sm89.*use int8"):
            LLMEngine(LoadedModel("qwen2", Path("qwen2"), config, model, None),
                      EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024, kv_cache_dtype="fp8"))


def test_the_varlen_path_passes_flash_attn_its_contract(card):
    engine, *_ = card
    varlen = VarlenContract()
    engine.runner.model.use_varlen_attention(varlen)
    engine.runner.model.use_paged_decode(None)
    run_steps(engine, steps=1)
    assert varlen.calls == 2 * engine.model_config.num_layers


# -- injected defects: the dry run must fail on each ------------------------------------------------------------


def test_a_cpu_tensor_in_the_step_fails_it(card, monkeypatch):
    engine, *_ = card
    original = ModelRunner.step_inputs

    def with_cpu_cos(self, packed, shape):
        token_ids, inputs = original(self, packed, shape)
        inputs.cos = torch.empty(inputs.cos.shape, dtype=inputs.cos.dtype, device="cpu")
        return token_ids, inputs

    monkeypatch.setattr(ModelRunner, "step_inputs", with_cpu_cos)
    with pytest.raises((RuntimeError, AssertionError), match="device"):  # fake tensors or a stand-in catch it
        run_steps(engine, steps=0)


def test_a_host_sync_in_the_step_fails_it(card):
    engine, *_ = card
    engine.runner.model.layers[0].register_forward_pre_hook(lambda module, args: args[0].abs().max().item())
    with pytest.raises(Exception, match=r"data-dependent|item|_local_scalar_dense"):
        run_steps(engine, steps=0)


def test_a_wrong_flash_attn_argument_fails_it(card, monkeypatch):
    engine, *_ = card
    engine.runner.model.use_varlen_attention(VarlenContract())
    original = VarlenLayout.__init__

    def int64_offsets(self, kv_slots, cu_seqlens_q, cu_seqlens_k, max_q, max_k):
        original(self, kv_slots, cu_seqlens_q.long(), cu_seqlens_k.long(), max_q, max_k)

    monkeypatch.setattr(VarlenLayout, "__init__", int64_offsets)
    with pytest.raises(AssertionError):
        run_steps(engine, steps=0)


def test_a_hybrid_models_steps_run_on_the_card():
    """Qwen3.5's shapes (24 Gated DeltaNet layers, 8 gated-attention layers with partial rotary): prompts on the
    chunked form and decode rows on the recurrent one, their states in the card's state cache; decode attention on
    the paged kernel for the attention layers alone, RoPE in torch ops (the fused kernel rotates whole heads)."""
    name = "qwen3.5-defaults"
    config = model_config(name)
    with simulated_cuda((9, 0)):
        model = fake_model(config, dtype=torch.bfloat16)
        engine = LLMEngine(LoadedModel(name, Path(name), config, model, None),
                           EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024, state_snapshots=2))
        paged = PagedDecodeContract(config.num_heads, config.num_kv_heads, config.head_dim)
        model.use_paged_decode(lambda: paged)
        assert engine.runner.decode_graphs is None and model.attentions[0].rope_store is None
        logits = run_steps(engine)
    for step in logits:
        on_stand_in(step)
        assert step.shape == (len(PROMPTS), config.vocab_size)
    assert paged.calls == DECODE_STEPS * config.num_attention_layers == DECODE_STEPS * 8
    states = engine.runner.states.layers
    assert len(states) == 24 and states[0].recurrent.dtype == torch.float32
    on_stand_in(states[0].recurrent, states[0].conv)
