"""Whole engine steps (``LLMEngine.step``: scheduling, the forward pass, the sampler and the read-back) of the real
engine code at Qwen-7B-Chat's and Qwen2-7B's shapes, for a simulated CUDA card, on fake tensors: the CUDA-only
kernels (the Triton paged decode, RoPE/cache write, RMSNorm and SwiGLU, flash-attn's varlen) are stand-ins that
assert their calling contract, CUDA graphs are recorded by a stand-in capture, ``torch.cuda.is_available`` is
simulated so every upload takes the pinned path, and ``TransferWatch`` fails the step at any other copy between
host and card. A CPU tensor in the step, a host sync or a data-dependent shape makes torch's fake tensors or the
watch raise; a wrong kernel argument makes a stand-in raise. The last tests inject each defect and check that the
dry run fails."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import engine.engine
import engine.sampling
import engine.transfer
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.dry_run import STAND_IN, fake_model, simulated_cuda
from engine.engine import StepOutput
from engine.kernels import triton_norm, triton_recurrent
from engine.model import VarlenLayout
from engine.runner import ModelRunner
from engine.scheduler import SchedulerConfig
from engine.weights.loader import LoadedModel
from tests.gpu_dry.conftest import model_config, raw_config
from tests.gpu_dry.stand_ins import (
    ChunkScanContract,
    ElementwiseContract,
    GrammarStandIn,
    PagedDecodeContract,
    ReadBack,
    RecordedCapture,
    RecurrenceContract,
    RopeStoreContract,
    TransferWatch,
    VarlenContract,
    on_stand_in,
    pin_memory,
)

PROMPTS = [list(range(1, 101)), list(range(7, 44)), list(range(200, 217)), list(range(300, 320))]
MAX_TOKENS = 4
TOKEN = 5  # what the read-back stand-in reads for every row


def sampling_params() -> list[SamplingParams]:
    """One row of each kind the sampler treats apart: greedy; sampled with truncation and logprobs; penalties,
    bias and a min_tokens ban; a grammar."""
    return [SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, logprobs=3),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.1, presence_penalty=0.5,
                           frequency_penalty=0.3, logit_bias={7: 2.0}, min_tokens=2, stop_token_ids=(9,)),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, grammar=GrammarStandIn())]


@dataclass
class Card:
    """An engine on the simulated card with every stand-in installed."""

    engine: LLMEngine
    watch: TransferWatch
    paged: PagedDecodeContract
    elementwise: ElementwiseContract
    read_back: ReadBack
    capture: RecordedCapture | None
    rope: RopeStoreContract | None = None
    recurrence: RecurrenceContract | None = None
    chunk_scan: ChunkScanContract | None = None

    def add_requests(self) -> list[SamplingParams]:
        """``PROMPTS`` with ``sampling_params``, admitted under the watch (their penalty tensors are uploads)."""
        params = sampling_params()
        with self.watch.watching():
            for index, (prompt, row) in enumerate(zip(PROMPTS, params, strict=True)):
                self.engine.add_request(str(index), prompt, row)
        return params

    def steps(self) -> list[list[StepOutput]]:
        """Every step until the requests finish, each under the watch."""
        outputs = []
        while self.engine.has_unfinished():
            with self.watch.watching():
                outputs.append(self.engine.step())
        return outputs


@pytest.fixture
def simulated_card(monkeypatch) -> Iterator[TransferWatch]:
    """A CUDA runtime as the step sees it (``is_available``, pinned memory) on fake tensors the watch sees."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    with simulated_cuda((9, 0), TransferWatch()) as watch:
        yield watch


def on_the_card(name: str, engine_config: EngineConfig, watch: TransferWatch, monkeypatch, *,
                rope: bool = True) -> Card:
    """``name``'s model and engine on the simulated card (call within ``simulated_card``), every stand-in in place;
    with its multi-token-prediction block when ``engine_config`` drafts."""
    config = model_config(name)
    if engine_config.speculative_tokens:
        config = dataclasses.replace(config, mtp_layers=1)
    model = fake_model(config, dtype=torch.bfloat16, quantization=raw_config(name).get("quantization_config"))
    elementwise = ElementwiseContract()
    monkeypatch.setattr(triton_norm, "rms_norm", elementwise.rms_norm)
    monkeypatch.setattr(triton_norm, "silu_and_mul", elementwise.silu_and_mul)
    recurrence, chunk_scan = RecurrenceContract(), ChunkScanContract()
    monkeypatch.setattr(triton_recurrent, "delta_rule", recurrence.delta_rule)
    monkeypatch.setattr(triton_recurrent, "scan", chunk_scan.scan)
    engine = LLMEngine(LoadedModel(name, Path(name), config, model, None), engine_config)
    paged = PagedDecodeContract(config.num_heads, config.num_kv_heads, config.head_dim)
    model.use_paged_decode(lambda: paged)
    store = RopeStoreContract(config.num_heads, config.num_kv_heads, config.head_dim) if rope else None
    if store is not None:
        model.use_rope_store(lambda: store)
    read_back = ReadBack(TOKEN)
    engine.sampler.read_back = read_back
    capture = None
    if engine.runner.decode_graphs is not None:
        capture = engine.runner.decode_graphs.capture = RecordedCapture(watch)
    return Card(engine, watch, paged, elementwise, read_back, capture, store, recurrence, chunk_scan)


def chunking_card(name: str, kv_cache_dtype: str, watch: TransferWatch, monkeypatch) -> Card:
    """The engine over ``name``'s model built for an sm90 card (a KV cache in bf16, int8 or fp8); prompts over 64
    tokens of a step are computed in chunks, so steps mix prompt chunks and decodes."""
    return on_the_card(name, EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024, kv_cache_dtype=kv_cache_dtype,
                                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)),
                       watch, monkeypatch)


@pytest.fixture(params=[("qwen-7b-chat", "auto"), ("qwen-7b-chat-int4", "auto"), ("qwen2-7b-instruct", "auto"),
                        ("qwen2-7b-instruct", "int8"), ("qwen2-7b-instruct", "fp8")], ids=lambda p: "-".join(p))
def card(request, simulated_card, monkeypatch) -> Card:
    return chunking_card(*request.param, simulated_card, monkeypatch)


@pytest.fixture
def qwen2_card(simulated_card, monkeypatch) -> Card:
    """One card for the injected defects (each is a defect of the engine's code, not of a model's)."""
    return chunking_card("qwen2-7b-instruct", "auto", simulated_card, monkeypatch)


def test_whole_steps_run_on_the_card(card):
    params = card.add_requests()
    outputs = card.steps()
    tokens: dict[str, list[int]] = {}
    for step in outputs:
        for output in step:
            assert output.error is None, output.error
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    assert tokens == {str(i): [TOKEN] * MAX_TOKENS for i in range(len(PROMPTS))}
    llm_engine, layers = card.engine, card.engine.model_config.num_layers
    # 234 prompt tokens at 64 a step: prompt chunks beside decodes, then decode steps alone, each replayed from
    # its bucket's capture; a forward pass runs for every other step and for each capture
    captured = llm_engine.runner.decode_graphs.captured
    assert card.capture.captures == len(captured) >= 1 and card.capture.replays >= 2
    forwards = len(outputs) - card.capture.replays + card.capture.captures
    assert card.read_back.calls == len(outputs)  # one read-back per step
    # every upload pinned and non-blocking (the watch), and few: the step's integers (at least those, every step),
    # the rows it samples, the sampler's parameters, the grammar's bitmask, the penalties' indices
    assert len(outputs) <= card.watch.uploads <= 8 * len(outputs)
    assert card.paged.calls == card.capture.captures * layers  # decode-only steps are the captured ones
    assert card.rope.calls == forwards * layers
    assert card.elementwise.norms == (2 * layers + 1) * forwards
    assert card.elementwise.activations == layers * forwards
    assert params[3].grammar.matchers[0].fills == MAX_TOKENS
    assert llm_engine.runner.kv_cache.data.device == STAND_IN
    assert llm_engine.runner.kv_cache.data.dtype == {"auto": torch.bfloat16, "int8": torch.int8,
                                                     "fp8": torch.float8_e4m3fn}[llm_engine.config.kv_cache_dtype]


def test_an_fp8_cache_is_refused_before_ada():
    """sm80 (A100) has no fp8 conversions: the engine refuses at start, naming the way out."""
    config = model_config("qwen2-7b-instruct")
    with simulated_cuda((8, 0)):
        model = fake_model(config, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"fp8 needs .* \(sm89.*use int8"):
            LLMEngine(LoadedModel("qwen2", Path("qwen2"), config, model, None),
                      EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024, kv_cache_dtype="fp8"))


def test_the_varlen_path_passes_flash_attn_its_contract(card):
    """flash-attn for every step (decode steps too, eagerly: no paged kernel, no graphs)."""
    varlen = VarlenContract()
    card.engine.runner.model.use_varlen_attention(varlen)
    card.engine.runner.model.use_paged_decode(None)
    card.engine.runner.use_decode_graphs(None)
    card.add_requests()
    outputs = card.steps()
    assert all(output.error is None for step in outputs for output in step)
    assert varlen.calls == len(outputs) * card.engine.model_config.num_layers


def test_a_hybrid_models_steps_run_on_the_card(simulated_card, monkeypatch):
    """Qwen3.5's shapes (24 Gated DeltaNet layers, 8 gated-attention layers with partial rotary): every linear
    layer's delta rule on its Triton kernels (one call for a step's decode rows, one for each prompt or span of one
    under a chunk; the chunk scan for a longer span, the chunked form's terms in torch on the card), the states in
    the card's state cache; decode attention on the paged kernel for the attention layers alone, eagerly (no graphs:
    states are placed by host indices), RoPE in torch ops (the fused kernel rotates whole heads)."""
    card = on_the_card("qwen3.5-defaults", EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024,
                                                        state_snapshots=2), simulated_card, monkeypatch,
                       rope=False)
    config, model = card.engine.model_config, card.engine.runner.model
    assert card.engine.runner.decode_graphs is None and model.attentions[0].rope_store is None
    card.add_requests()
    outputs = card.steps()
    assert all(output.error is None for step in outputs for output in step)
    assert len(outputs) == MAX_TOKENS and card.read_back.calls == MAX_TOKENS  # one prefill, then decode steps
    assert card.paged.calls == (MAX_TOKENS - 1) * config.num_attention_layers == (MAX_TOKENS - 1) * 8
    assert card.elementwise.norms > 0 and card.elementwise.activations == MAX_TOKENS * config.num_layers
    # the 100-token prompt: its first 96 on the chunk scan (64 and a padded 32; a snapshot kept at its last full
    # block), its last 4 on the token kernel beside the other prompts' rows
    linear_layers, rows = len(config.linear_layers), len(PROMPTS)
    assert card.recurrence is not None and card.recurrence.calls == (rows + MAX_TOKENS - 1) * linear_layers
    assert card.recurrence.rows == rows * MAX_TOKENS * linear_layers
    assert card.chunk_scan is not None and card.chunk_scan.calls == linear_layers
    assert card.chunk_scan.chunks == 2 * linear_layers
    states = card.engine.runner.states.layers
    assert len(states) == 24 and states[0].recurrent.dtype == torch.float32
    on_stand_in(states[0].recurrent, states[0].conv)


def test_a_drafting_hybrid_model_s_steps_run_on_the_card(simulated_card, monkeypatch):
    """Qwen3.5's shapes with a multi-token-prediction block drafting 2 tokens a step (the read-back stand-in reads
    the same token for every row, so every draft stands): the block's passes read their drafts back as the sampler
    reads its tokens, the verifying step's tokens are decode rows of the paged kernel, its linear layers advance in
    three rounds (a Triton call each), and each request gets its tokens in two steps."""
    card = on_the_card("qwen3.5-defaults", EngineConfig(kv_cache_memory=1 << 30, max_model_len=1024, state_snapshots=2,
                                                        speculative_tokens=2), simulated_card, monkeypatch,
                       rope=False)
    config, engine = card.engine.model_config, card.engine
    assert engine.runner.model.mtp is not None and config.num_attention_layers == 8 + 1
    card.add_requests()
    outputs = card.steps()
    assert all(output.error is None for step in outputs for output in step)
    assert len(outputs) == 2 and all(len(output.new_token_ids) == MAX_TOKENS - 1 for output in outputs[1])
    stats = engine.stats()
    assert stats.spec_drafts == len(PROMPTS) and stats.spec_accepted_tokens == stats.spec_draft_tokens == 8
    assert card.read_back.calls == 1 + 2 + 3  # the prefill's sampling, two drafts, three verifying rounds
    assert card.paged.calls == 8 + 1  # the verifying step's attention layers, the block's second draft
    linear_layers, rows = len(config.linear_layers), len(PROMPTS)  # the prompts as in the test above
    assert card.recurrence is not None and card.recurrence.calls == (rows + 3) * linear_layers
    assert card.recurrence.rows == (rows + 3 * rows) * linear_layers
    assert card.chunk_scan is not None and card.chunk_scan.calls == linear_layers


# -- injected defects: the dry run must fail on each ------------------------------------------------------------


def errors(outputs: list[list[StepOutput]]) -> list[str]:
    return [output.error for step in outputs for output in step if output.error is not None]


@pytest.mark.parametrize("read", [torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item],
                         ids=["cpu", "tolist", "numpy", "item"])
def test_a_host_read_in_the_sampler_fails_the_step(qwen2_card, monkeypatch, read):
    """The engine ends a row whose sampling fails and runs on: each row's error names the host read."""
    def masking_with_a_read(logits, rows):
        read(logits[0, :1].float())
        return mask_logits(logits, rows)

    mask_logits = engine.sampling.mask_logits
    monkeypatch.setattr(engine.sampling, "mask_logits", masking_with_a_read)
    qwen2_card.add_requests()
    failed = errors(qwen2_card.steps())
    assert len(failed) == len(PROMPTS)
    assert all(
        "HostTransferError" in error or "not supported for tensor subclasses" in error for error in failed), failed


def test_a_pageable_upload_fails_the_step(qwen2_card, monkeypatch):
    """``torch.tensor(values, device=card)`` for the sampled rows (what the engine did before ``to_device``)."""
    monkeypatch.setattr(engine.engine, "to_device",
                        lambda values, dtype, device: torch.tensor(values, dtype=dtype, device=device))
    qwen2_card.add_requests()
    with pytest.raises(AssertionError, match="non-Fake Tensor"):  # built on the card from host data, not fake
        qwen2_card.steps()


def test_an_unpinned_upload_fails_the_step(qwen2_card, monkeypatch):
    monkeypatch.setattr(engine.transfer, "pinned", lambda host, device: host)
    with pytest.raises(AssertionError, match="pageable"):
        qwen2_card.add_requests()
        qwen2_card.steps()


def test_an_upload_inside_a_captured_step_fails_it(qwen2_card, monkeypatch):
    original = ModelRunner.step_inputs

    def with_a_decode_upload(self, packed, shape):
        if shape.max_q == 1:
            engine.transfer.to_device([0], torch.long, self.device)
        return original(self, packed, shape)

    monkeypatch.setattr(ModelRunner, "step_inputs", with_a_decode_upload)
    qwen2_card.add_requests()
    with pytest.raises(AssertionError, match="inside a captured graph"):
        qwen2_card.steps()


@pytest.mark.parametrize("kind", ["prompt", "decode"])
def test_a_cpu_tensor_in_the_step_fails_it(qwen2_card, monkeypatch, kind):
    original = ModelRunner.step_inputs

    def with_cpu_cos(self, packed, shape):
        token_ids, inputs = original(self, packed, shape)
        if (shape.max_q == 1) == (kind == "decode"):
            inputs.cos = torch.empty(inputs.cos.shape, dtype=inputs.cos.dtype, device="cpu")
        return token_ids, inputs

    monkeypatch.setattr(ModelRunner, "step_inputs", with_cpu_cos)
    qwen2_card.add_requests()
    with pytest.raises((RuntimeError, AssertionError), match="device"):  # fake tensors or a stand-in catch it
        qwen2_card.steps()


def test_a_host_sync_in_a_layer_fails_the_step(qwen2_card):
    qwen2_card.engine.runner.model.layers[0].register_forward_pre_hook(lambda module, args: args[0].abs().max().item())
    qwen2_card.add_requests()
    with pytest.raises(AssertionError, match=r"_local_scalar_dense.* host sync"):
        qwen2_card.steps()


def test_a_wrong_flash_attn_argument_fails_the_step(qwen2_card, monkeypatch):
    qwen2_card.engine.runner.model.use_varlen_attention(VarlenContract())
    original = VarlenLayout.__init__

    def int64_offsets(self, kv_slots, cu_seqlens_q, cu_seqlens_k, max_q, max_k):
        original(self, kv_slots, cu_seqlens_q.long(), cu_seqlens_k.long(), max_q, max_k)

    monkeypatch.setattr(VarlenLayout, "__init__", int64_offsets)
    qwen2_card.add_requests()
    with pytest.raises(AssertionError):
        qwen2_card.steps()
