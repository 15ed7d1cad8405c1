"""The Qwen-1 model against oracles recorded from the original modeling_qwen.py (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams, SchedulerConfig
from tests.conftest import load_fixture
from tests.unit.engine.conftest import QWEN1_MODEL, decode_alone, qwen1_engine, run_requests

CASES = load_fixture("qwen1/cases.json")
BATCH = load_fixture("qwen1/batch.json")
GREEDY = SamplingParams(temperature=0, max_tokens=24)
ATOL = 1e-4  # fp32 logits: README's bound, absolute (rtol 0)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(QWEN1_MODEL), dtype="float32", device="cpu")


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["name"])
def test_full_forward_logits(llm, qwen1_logits, case):
    logits = llm.engine.prompt_logits(case["prompt_ids"])
    close(logits, qwen1_logits[case["prompt_logits_key"]])


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["name"])
def test_greedy_decode_logits_and_tokens(qwen1_logits, case):
    tokens, logits = decode_alone(qwen1_engine(), case["prompt_ids"], GREEDY)
    assert tokens == case["new_ids"]
    close(logits, qwen1_logits[case["decode_logits_key"]])


def test_every_row_of_any_batch_yields_its_solo_tokens(llm):
    prompts = [c["prompt_ids"] for c in CASES["cases"]]
    prompts += [row["prompt_ids"] for group in BATCH["groups"] for row in group["rows"]]
    solo = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == solo
    reordered = [o.token_ids for o in llm.generate(prompts[::-1], GREEDY)]
    assert reordered == solo[::-1]


@pytest.mark.parametrize("group", BATCH["groups"], ids=lambda g: g["group"])
def test_batch_fixture(llm, group):
    params = SamplingParams(temperature=0, max_tokens=group["n_new"])
    outputs = llm.generate([row["prompt_ids"] for row in group["rows"]], params)
    for row, output in zip(group["rows"], outputs, strict=True):
        assert output.token_ids == row["solo_new_ids"]
        if group["group"] == "short":  # within seq_length the original batch path equals solo
            assert output.token_ids == row["batched_new_ids"]


# Multi-token stop words are stop strings, matched by the server; the engine stops on single tokens.
SINGLE_TOKEN_STOPS = [c for c in CASES["stop_words_cases"]
                      if any(len(w) == 1 and w[0] != c["eos_token_id"] for w in c["stop_words_ids"])]


@pytest.mark.parametrize("case", SINGLE_TOKEN_STOPS, ids=lambda c: str(c["stop_words_ids"]))
def test_single_token_stop_words(llm, case):
    single = [w[0] for w in case["stop_words_ids"] if len(w) == 1 and w[0] != case["eos_token_id"]]
    params = SamplingParams(temperature=0, max_tokens=case["max_new_tokens"], stop_token_ids=single)
    output = llm.generate([case["prompt_ids"]], params)[0]
    expected = case["new_ids"][:-1]  # the original forces eos after the stop word
    assert output.token_ids == expected[:-1] and output.finish_reason == "stop"


def test_ntk_alpha_survives_preemption_and_prefix_hits():
    long_cases = [c for c in CASES["cases"] if c["prompt_len"] > 32]
    prompts = [c["prompt_ids"] for c in long_cases] * 2
    # Four blocks of 16 for ~4 sequences needing 5-8 blocks each: constant preemption by recompute.
    tiny = qwen1_engine(kv_cache_memory=2 * 2 * 4 * 16 * 4 * 16 * 16,
                        scheduler=SchedulerConfig(max_num_seqs=4))
    tiny.config.max_model_len = 120
    outputs = run_requests(tiny, prompts, GREEDY)
    assert tiny.scheduler.num_preemptions > 0
    assert tiny.blocks.prefix_hits > 0
    for index, case in enumerate(long_cases * 2):
        assert outputs[index] == case["new_ids"]


def test_prefix_cache_hit_keeps_tokens(llm):
    case = CASES["cases"][-1]
    engine = llm.engine
    first = llm.generate([case["prompt_ids"]], GREEDY)[0]
    hits_before = engine.blocks.prefix_hits
    second = llm.generate([case["prompt_ids"]], GREEDY)[0]
    assert engine.blocks.prefix_hits - hits_before >= 80
    assert second.num_cached_tokens >= 80
    assert first.token_ids == second.token_ids == case["new_ids"]


def test_context_length_follows_dynamic_ntk(llm):
    assert llm.engine.max_model_len == 256  # max_position_embeddings, not seq_length (32)
    long_prompt = CASES["cases"][-1]["prompt_ids"] * 2
    output = llm.generate([long_prompt], SamplingParams(temperature=0, max_tokens=500))[0]
    assert output.finish_reason == "length"
    assert len(long_prompt) + len(output.token_ids) == 256


def test_kv_cache_too_small_for_the_context_is_refused():
    with pytest.raises(ValueError, match="max_model_len"):
        qwen1_engine(kv_cache_memory=1024, block_size=16)
