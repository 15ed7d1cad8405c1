"""The varlen attention layout (flash-attn's on CUDA) against the oracles and the padded path, on CPU in fp32.

flash-attn runs only on CUDA, so here the model is handed a plain-torch kernel with ``flash_attn_varlen_func``'s
contract (packed q/k/v, int32 offsets, int maxima, causal masking aligned to the bottom right). These tests check
what this project builds for that kernel (packed key slots, offsets, the layer's call); flash-attn itself is
checked by ``test_cuda.py`` where a GPU and the package are present.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from engine import LLM, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.kernels.sequential_attention import sequential_varlen
from engine.runner import varlen_layout
from tests.conftest import load_fixture
from tests.unit.engine.conftest import QWEN1_MODEL, qwen1_engine, run_requests
from tests.unit.engine.test_models_vs_transformers import CONFIGS, write_checkpoint

CASES = load_fixture("qwen1/cases.json")["cases"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale, causal):
    """flash_attn_varlen_func's semantics in plain torch, one sequence at a time, with its input checks."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == v.shape[0] == cu_seqlens_k[-1]
    assert causal
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]))
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        lq, lk = qe - qs, ke - ks
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        out[qs:qe] = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1), attn_mask=mask,
            scale=softmax_scale, enable_gqa=True).transpose(0, 1)
    return out


def on_varlen(llm_or_engine):
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    engine.runner.model.use_varlen_attention(reference_varlen)
    assert engine.runner.model.uses_varlen(1)
    return llm_or_engine


def on_padded(engine: LLMEngine) -> LLMEngine:
    engine.runner.model.use_varlen_attention(None)
    assert not engine.runner.model.uses_varlen(2)
    return engine


@pytest.fixture(scope="module")
def varlen_llm() -> LLM:
    return on_varlen(LLM(str(QWEN1_MODEL), dtype="float32", device="cpu"))


@pytest.mark.parametrize("lengths", [[(5, 5), (1, 20), (3, 12)], [(7, 30), (7, 7), (1, 1)]])
def test_the_cpu_kernel_follows_the_varlen_contract(lengths):
    """``sequential_varlen`` (the CPU's kernel for steps with prompts) against the contract's reference: prompts,
    chunks over earlier keys, decode rows, grouped heads."""
    generator = torch.Generator().manual_seed(3)
    q_lens, k_lens = zip(*lengths, strict=True)
    q = torch.randn(sum(q_lens), 4, 16, generator=generator)
    k, v = (torch.randn(sum(k_lens), 2, 16, generator=generator) for _ in range(2))
    offsets = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (q_lens, k_lens)]
    args = (q, k, v, *offsets, max(q_lens), max(k_lens))
    torch.testing.assert_close(sequential_varlen(*args, softmax_scale=0.25, causal=True),
                               reference_varlen(*args, softmax_scale=0.25, causal=True), rtol=0, atol=1e-6)


def test_cpu_models_run_prompts_on_it_and_decodes_on_the_padded_path():
    model = LLM(str(QWEN1_MODEL), dtype="float32", device="cpu").engine.runner.model
    assert model.uses_varlen(2) and not model.uses_varlen(1)


def test_layout_packs_each_sequence_keys_in_order():
    slots = torch.arange(3 * 32).view(3, 32) * 10  # three sequences, two blocks of 16 each
    q_lens, kv_lens = torch.tensor([5, 1, 3]), torch.tensor([5, 20, 12])
    layout = varlen_layout(slots, q_lens, kv_lens, 5, [5, 20, 12])
    expected = torch.cat([slots[0, :5], slots[1, :20], slots[2, :12]])
    assert torch.equal(layout.kv_slots, expected)
    assert layout.cu_seqlens_q.tolist() == [0, 5, 6, 9] and layout.cu_seqlens_k.tolist() == [0, 5, 25, 37]
    assert layout.cu_seqlens_q.dtype == torch.int32 and (layout.max_q, layout.max_k) == (5, 20)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_varlen_logits_match_the_oracles(varlen_llm, qwen1_logits, case):
    logits = varlen_llm.engine.prompt_logits(case["prompt_ids"])
    torch.testing.assert_close(logits, qwen1_logits[case["prompt_logits_key"]], atol=1e-4, rtol=0)


def test_varlen_batch_yields_the_fixture_tokens(varlen_llm):
    outputs = varlen_llm.generate([c["prompt_ids"] for c in CASES], GREEDY)
    assert [o.token_ids for o in outputs] == [c["new_ids"] for c in CASES]


def test_varlen_with_prefix_hits_and_preemption():
    """Prefills on cached prefixes (fewer queries than keys) share steps with decodes; preemption recomputes."""
    long_cases = [c for c in CASES if c["prompt_len"] > 32]
    engine = on_varlen(qwen1_engine(kv_cache_memory=2 * 2 * 4 * 16 * 4 * 16 * 16,
                                    scheduler=SchedulerConfig(max_num_seqs=4)))
    engine.config.max_model_len = 120
    outputs = run_requests(engine, [c["prompt_ids"] for c in long_cases * 2], GREEDY)
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.prefix_hits > 0
    assert outputs == [c["new_ids"] for c in long_cases * 2]


def test_varlen_grouped_query_attention_equals_the_padded_path(tmp_path):
    write_checkpoint(tmp_path, CONFIGS["qwen2"](), seed=5)  # 4 query heads over 2 key/value heads
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 320, (40,), generator=generator).tolist()
    prompts = [prefix + torch.randint(0, 320, (n,), generator=generator).tolist() for n in (3, 17, 30, 1, 9, 24)]
    params = SamplingParams(temperature=0, max_tokens=12)

    def engine() -> LLMEngine:
        return LLMEngine.from_model(str(tmp_path), dtype="float32", device="cpu",
                                    config=EngineConfig(kv_cache_memory=8 << 20))

    padded, varlen = on_padded(engine()), on_varlen(engine())
    torch.testing.assert_close(varlen.prompt_logits(prompts[2]), padded.prompt_logits(prompts[2]),
                               atol=1e-5, rtol=1e-5)
    assert (run_requests(varlen, prompts, params, staggered=True)
            == run_requests(padded, prompts, params, staggered=True))
    assert varlen.blocks.prefix_hits > 0
