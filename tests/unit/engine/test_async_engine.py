"""Continuous batching through AsyncEngine on the real SmolLM2 (fp32): invariance, prefix cache, preemption,
abort, seeds, queue bound and failure."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import AsyncEngine, EngineConfig, EngineDeadError, LLMEngine, QueueFullError, SamplingParams
from engine.kv_store import kv_bytes_per_token
from engine.scheduler import SchedulerConfig
from engine.weights.loader import load_model
from tests.unit.engine.conftest import RecordingSampler, run_requests
from tokenizer import ChatMessage, build_prompt

TOPICS = ["the sea", "a robot", "winter", "coffee", "the moon", "a library", "trains", "music", "a garden",
          "mountains", "the city at night", "a cat", "rain", "an old map", "bread", "the desert"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(str(smollm2_gguf), dtype=torch.float32, device=torch.device("cpu"))


def engine_over(loaded, **config) -> LLMEngine:
    config.setdefault("max_model_len", 1024)
    scheduler = config.pop("scheduler", SchedulerConfig())
    return LLMEngine(loaded, EngineConfig(kv_cache_memory=config.pop("kv", 64 << 20), scheduler=scheduler,
                                          **config))


def prompt(loaded, text: str) -> list[int]:
    return build_prompt(loaded.tokenizer, [ChatMessage("user", text)]).token_ids


def run_solo(engine: LLMEngine, ids: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("solo", ids, params)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    return tokens


async def collect(engine: AsyncEngine, request_id: str, ids: list[int], params: SamplingParams,
                  delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    tokens = []
    async for out in engine.generate(request_id, ids, params):
        tokens += out.new_token_ids
    return tokens


def test_staggered_batch_equals_solo(smollm2):
    prompts = [prompt(smollm2, f"Write one sentence about {topic}.") for topic in TOPICS]
    solo_engine = engine_over(smollm2)
    solo = [run_solo(solo_engine, ids, GREEDY) for ids in prompts]
    async_engine = AsyncEngine(engine_over(smollm2))
    peak = 0

    async def main():
        nonlocal peak
        tasks = [asyncio.create_task(collect(async_engine, f"r{i}", ids, GREEDY, delay=0.03 * i))
                 for i, ids in enumerate(prompts)]
        while not all(t.done() for t in tasks):
            peak = max(peak, async_engine.stats.running)
            await asyncio.sleep(0.01)
        return [t.result() for t in tasks]

    try:
        together = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert peak > 1
    assert together == solo


def first_step_logits(engine: LLMEngine, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """A request's tokens and the logits its first token was sampled from."""
    engine.sampler = recorder = RecordingSampler()
    return run_solo(engine, ids, GREEDY), recorder.steps[0][0]


# An int8 cache rounds each key and value row to 8 bits: where fp32 gives a key a last-bit different value in a
# prompt of another length (matmul blocking), its byte can round one step the other way (~300 of 8,000 bytes a
# layer from layer 15 on; SmolLM2's keys reach scales where one step moves a logit). The cached prefix's bytes are
# then those its first request wrote, and the warm logits within the measured 0.30 (of ~31) of a cold run's.
INT8_LOGITS_ATOL = 0.6


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_shared_prefix_hits_the_cache_with_the_cold_runs_output(smollm2, kv_cache_dtype):
    """Full precision: the same tokens as a cold run; int8: the same first-step logits within the rounding above."""
    system = " ".join(f"Rule {i}: answer politely and briefly." for i in range(40))
    first = build_prompt(smollm2.tokenizer, [ChatMessage("system", system), ChatMessage("user", "Hi!")]).token_ids
    second = build_prompt(smollm2.tokenizer, [ChatMessage("system", system),
                                              ChatMessage("user", "Name a color.")]).token_ids
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= 256
    cold, cold_logits = first_step_logits(engine_over(smollm2, kv_cache_dtype=kv_cache_dtype), second)
    warm_engine = engine_over(smollm2, kv_cache_dtype=kv_cache_dtype)
    run_solo(warm_engine, first, GREEDY)
    hits = warm_engine.blocks.prefix_hits
    warm, warm_logits = first_step_logits(warm_engine, second)
    assert warm_engine.blocks.prefix_hits - hits >= shared // 16 * 16
    if kv_cache_dtype == "auto":
        assert warm == cold
    else:
        torch.testing.assert_close(warm_logits, cold_logits, atol=INT8_LOGITS_ATOL, rtol=0)


PREEMPTED = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def preempting_prompts(loaded) -> list[list[int]]:
    return [prompt(loaded, f"Describe {topic} in detail.") for topic in TOPICS[:6]]


def preempting_run(loaded, kv_cache_dtype: str) -> tuple[LLMEngine, list[list[int]]]:
    """Six requests through a cache of 272 slots (for ~6 x 75 tokens)."""
    per_token = kv_bytes_per_token(loaded.config, torch.float32, kv_cache_dtype)
    tight = engine_over(loaded, max_model_len=256, kv=per_token * 16 * 17, kv_cache_dtype=kv_cache_dtype)
    return tight, run_requests(tight, preempting_prompts(loaded), PREEMPTED)


def test_preemption_keeps_tokens(smollm2):
    """Each request's tokens are those it gets alone in a roomy cache."""
    tight, outputs = preempting_run(smollm2, "auto")
    roomy = engine_over(smollm2, max_model_len=256)
    assert tight.scheduler.num_preemptions > 0
    assert outputs == [run_solo(roomy, ids, PREEMPTED) for ids in preempting_prompts(smollm2)]
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_preemption_with_an_int8_cache_finishes_every_request_and_frees_every_block(smollm2):
    """With int8 keys and values a recomputed sequence requantizes keys that a prefill-shaped matmul computed
    (fp32 results that differ from the decode's in the last bits), so a near-tie may later go the other way: the
    tokens are not compared. Each request still gets all its tokens, and no block is lost."""
    tight, outputs = preempting_run(smollm2, "int8")
    assert tight.scheduler.num_preemptions > 0
    assert [len(tokens) for tokens in outputs] == [PREEMPTED.max_tokens] * 6
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_seeded_sampling_is_reproducible_across_batch_compositions(smollm2):
    ids = prompt(smollm2, "Tell me a short story.")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = run_solo(engine_over(smollm2), ids, params)
    crowded = engine_over(smollm2)
    crowded.add_request("seeded", ids, params)
    for i, topic in enumerate(TOPICS[:5]):
        crowded.add_request(f"other{i}", prompt(smollm2, topic), SamplingParams(temperature=1.0, max_tokens=16))
    tokens = []
    while crowded.has_unfinished():
        tokens += [t for out in crowded.step() if out.request_id == "seeded" for t in out.new_token_ids]
    assert tokens == alone
    assert run_solo(engine_over(smollm2), ids, SamplingParams(temperature=0.9, top_p=0.95, seed=99,
                                                             max_tokens=16, ignore_eos=True)) != alone


def test_abort_frees_blocks_at_once(smollm2):
    engine = engine_over(smollm2)
    async_engine = AsyncEngine(engine)

    async def main():
        stream = async_engine.generate("long", prompt(smollm2, "Count to one thousand."),
                                       SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        for _ in range(200):
            if engine.blocks.num_free == engine.blocks.num_blocks and async_engine.stats.running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_queue_bound_is_reported(smollm2):
    engine = engine_over(smollm2, scheduler=SchedulerConfig(max_num_seqs=1, max_waiting=1))
    async_engine = AsyncEngine(engine)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        ids = prompt(smollm2, "Hello")
        first = asyncio.create_task(collect(async_engine, "a", ids, long))
        second = asyncio.create_task(collect(async_engine, "b", ids, long))
        for _ in range(1000):
            if async_engine.stats.waiting == 1 and async_engine.stats.running == 1:
                break
            await asyncio.sleep(0.01)
        assert async_engine.stats.waiting == 1 and async_engine.stats.running == 1
        with pytest.raises(QueueFullError):
            await collect(async_engine, "c", ids, long)
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_engine_failure_reaches_every_request_and_marks_it_dead(smollm2):
    engine = engine_over(smollm2)

    def broken(batch, all_logits=False):
        raise RuntimeError("simulated device failure")

    engine.runner.run = broken
    async_engine = AsyncEngine(engine)

    async def main():
        results = await asyncio.gather(
            *(collect(async_engine, f"r{i}", prompt(smollm2, "Hi"), GREEDY) for i in range(3)),
            return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results)
        with pytest.raises(EngineDeadError):
            await collect(async_engine, "later", prompt(smollm2, "Hi"), GREEDY)

    asyncio.run(main())
    assert not async_engine.is_alive


def test_invalid_requests_are_refused(smollm2):
    engine = engine_over(smollm2, max_model_len=64)
    from engine import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request("b", [1] * 64, GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("c", [49152], GREEDY)


def test_invalid_sampling_values_are_refused_at_add(smollm2):
    engine = engine_over(smollm2)
    from engine import InvalidRequestError

    ids = prompt(smollm2, "Hi")
    with pytest.raises(InvalidRequestError, match="top_k"):
        engine.add_request("k", ids, SamplingParams(top_k=2**63))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.add_request("b", ids, SamplingParams(logit_bias={49152: 1.0}))
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
    assert SamplingParams(temperature=1e-300).greedy


class _FailingGrammar:
    """A grammar whose matcher breaks when asked for its mask: a fault in one row's sampling."""

    def matcher(self, stop_ids):
        class Broken:
            def fill_next_token_bitmask(self, bitmask, index):
                raise RuntimeError("matcher fault")

            def accept_token(self, token_id):
                return True

        return Broken()


def test_a_row_that_fails_in_sampling_ends_alone(smollm2):
    prompts = [prompt(smollm2, f"Write one sentence about {topic}.") for topic in TOPICS[:3]]
    solo = [run_solo(engine_over(smollm2), ids, GREEDY) for ids in prompts]
    engine = engine_over(smollm2)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("bad", prompts[1], SamplingParams(temperature=0, max_tokens=20, grammar=_FailingGrammar()))
    engine.add_request("c", prompts[2], GREEDY)
    tokens: dict[str, list[int]] = {"a": [], "bad": [], "c": []}
    finished: dict[str, tuple[str | None, str | None]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.error)
    assert finished["bad"][0] == "error" and "matcher fault" in finished["bad"][1] and tokens["bad"] == []
    assert [tokens["a"], tokens["c"]] == [solo[0], solo[2]]
    assert finished["a"] == finished["c"] == ("length", None)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failed_request_reaches_its_caller_and_the_engine_runs_on(smollm2):
    from engine.async_engine import RequestFailedError

    async_engine = AsyncEngine(engine_over(smollm2))
    ids = prompt(smollm2, "Hi")

    async def main():
        bad = SamplingParams(temperature=0, max_tokens=5, grammar=_FailingGrammar())
        results = await asyncio.gather(collect(async_engine, "bad", ids, bad), collect(async_engine, "ok", ids, GREEDY),
                                       return_exceptions=True)
        assert isinstance(results[0], RequestFailedError) and len(results[1]) == GREEDY.max_tokens
        assert len(await collect(async_engine, "later", ids, GREEDY)) == GREEDY.max_tokens

    try:
        asyncio.run(main())
        assert async_engine.is_alive
    finally:
        async_engine.shutdown()


def test_prompt_logprobs_in_chunks_equal_the_full_logits(smollm2):
    import engine.engine as engine_module

    engine = engine_over(smollm2)
    ids = prompt(smollm2, "Count: one two three four five six seven eight nine ten.")
    full = engine.prompt_logits(ids).log_softmax(-1)  # the same forward pass over the whole prompt
    chunk = engine_module.PROMPT_LOGPROB_ROWS
    engine_module.PROMPT_LOGPROB_ROWS = 7  # several chunks, the last one partial
    try:
        entries = engine.prompt_logprobs(ids, 3)
    finally:
        engine_module.PROMPT_LOGPROB_ROWS = chunk
    assert entries[0] is None and len(entries) == len(ids)
    for position in range(1, len(ids)):
        row = full[position - 1]
        expected = {ids[position]: row[ids[position]].item()}
        values, top = row.topk(3)
        expected.update(zip(top.tolist(), values.tolist(), strict=True))
        # fp32: the head's matmul over 7 rows sums in another order than one over all rows, and the
        # normaliser of 49K fp32 terms moves by ~2e-5
        assert entries[position] == pytest.approx(expected, rel=0, abs=3e-5)
