"""Chunked prefill on the real SmolLM2 (fp32): a prompt longer than the step's token budget is computed over several
steps, gives the same tokens and logits as one whole prefill, and never holds up the requests behind it."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.scheduler import SchedulerConfig
from engine.weights.loader import load_model
from tests.unit.engine.conftest import RecordingSampler
from tokenizer import ChatMessage, build_prompt

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
BUDGET = 64


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(str(smollm2_gguf), dtype=torch.float32, device=torch.device("cpu"))


def engine_with_budget(loaded, budget: int) -> LLMEngine:
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    return LLMEngine(loaded, EngineConfig(kv_cache_memory=64 << 20, max_model_len=1024, scheduler=scheduler))


def long_prompt(loaded) -> list[int]:
    text = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(40))
    ids = build_prompt(loaded.tokenizer, [ChatMessage("user", text + " Which colour is item 7?")]).token_ids
    assert len(ids) > 4 * BUDGET
    return ids


def run_recorded(engine: LLMEngine, ids: list[int]) -> tuple[list[int], torch.Tensor, int]:
    """The new tokens, the logits of every sampled step, and how many steps sampled nothing (prompt chunks)."""
    engine.sampler = recorder = RecordingSampler()
    engine.add_request("r", ids, GREEDY)
    tokens, silent_steps = [], 0
    while engine.has_unfinished():
        outputs = engine.step()
        silent_steps += not outputs
        tokens += [t for out in outputs for t in out.new_token_ids]
    return tokens, torch.cat(recorder.steps), silent_steps


def test_a_chunked_prompt_gives_the_tokens_and_logits_of_one_prefill(smollm2):
    ids = long_prompt(smollm2)
    whole_tokens, whole_logits, whole_silent = run_recorded(engine_with_budget(smollm2, 4096), ids)
    chunked_tokens, chunked_logits, chunked_silent = run_recorded(engine_with_budget(smollm2, BUDGET), ids)
    assert whole_silent == 0
    assert chunked_silent == len(ids) // BUDGET  # every chunk but the last samples nothing
    assert chunked_tokens == whole_tokens
    # the same positions summed over other splits of the keys: fp32 rounding only
    torch.testing.assert_close(chunked_logits, whole_logits, rtol=0, atol=1e-4)


def test_a_long_prompt_does_not_hold_up_a_short_one_or_a_running_stream(smollm2):
    engine = engine_with_budget(smollm2, BUDGET)
    short = build_prompt(smollm2.tokenizer, [ChatMessage("user", "Say hi.")]).token_ids
    engine.add_request("stream", short, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    engine.add_request("long", long_prompt(smollm2), GREEDY)
    engine.add_request("short", short, GREEDY)
    first_token_step: dict[str, int] = {}
    for step in range(1, 6):
        outputs = engine.step()
        for out in outputs:
            first_token_step.setdefault(out.request_id, step)
        assert "stream" in {out.request_id for out in outputs}, f"the running stream got no token in step {step}"
        assert engine.scheduler.running[-1].request_id in ("long", "short")
    assert first_token_step["short"] == 1  # scheduled with the long prompt's first chunk, not after its last
    assert "long" not in first_token_step


def test_a_shared_prefix_is_offered_only_once_computed(smollm2):
    """A prompt that shares a long prompt's prefix while that one is still being prefilled reuses only the blocks
    whose keys are already written (or are written in the same step) and gives the solo tokens."""
    ids = long_prompt(smollm2)
    solo, _, _ = run_recorded(engine_with_budget(smollm2, 4096), ids)
    engine = engine_with_budget(smollm2, BUDGET)
    engine.add_request("first", ids, GREEDY)
    engine.step()  # one chunk of `first` computed
    engine.add_request("second", ids, GREEDY)
    tokens: dict[str, list[int]] = {"first": [], "second": []}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            cached[out.request_id] = out.num_cached_tokens
    assert cached == {"first": 0, "second": BUDGET}
    assert tokens["first"] == solo and tokens["second"] == solo


def test_the_budget_must_exceed_the_seats():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=32)
