"""Pooling requests against transformers on a tiny random Qwen3 (the Qwen3-Embedding and Qwen3-Reranker shape), fp32:
pooled embeddings (final hidden states after the final norm pooled by the last token, the mean or the first,
L2-normalised) and chosen tokens' logits at each prompt's last position, each prompt a prefill-only sequence of the
continuous batch: alone, packed with others of other lengths, chunked, beside a decoding request, preempted and
aborted."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers

from engine import LLM, AsyncEngine, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.engine import InvalidRequestError
from engine.pooling import PoolingTask
from engine.weights.loader import load_model
from tests.unit.engine.test_models_vs_transformers import CONFIGS, write_checkpoint

ATOL = 1e-5  # fp32, the bound on an embedding's every component


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-embedding")
    return folder, write_checkpoint(folder, CONFIGS["qwen3"](), seed=7)


@pytest.fixture(scope="module")
def models(checkpoint) -> tuple[LLM, transformers.PreTrainedModel]:
    folder, reference = checkpoint
    return LLM(str(folder), dtype="float32", device="cpu"), reference


def expected(reference, prompt: list[int], pooling: str) -> torch.Tensor:
    with torch.inference_mode():
        states = reference.model(torch.tensor([prompt])).last_hidden_state[0]
    pooled = {"last": states[-1], "cls": states[0], "mean": states.mean(0)}[pooling]
    return F.normalize(pooled, dim=-1)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_pooled_embeddings_match_transformers_alone_and_packed(models, pooling):
    llm, reference = models
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (37, 5, 120, 1)]
    theirs = torch.stack([expected(reference, p, pooling) for p in prompts])
    packed = llm.embed(prompts, pooling)
    alone = torch.cat([llm.embed([p], pooling) for p in prompts])
    torch.testing.assert_close(packed, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(alone, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.norm(dim=-1), torch.ones(len(prompts)), atol=1e-6, rtol=0)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks  # no block held after the request


def test_prompts_it_cannot_run_are_refused(models):
    llm, _ = models
    for prompts, pooling in (([[]], "last"), ([[1, 10**6]], "last"), ([[1]], "max"), ([], "last"),
                             ([[1] * 513], "last")):
        with pytest.raises(InvalidRequestError):
            llm.embed(prompts, pooling)
    with pytest.raises(InvalidRequestError):
        llm.last_token_logits([[1, 2]], [17, 10**6])
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_last_token_logits_of_chosen_tokens_match_transformers(models, tmp_path, tied):
    """A reranker's judgement: the logits of two tokens at each prompt's last position, packed in one pass, from
    those tokens' rows of the head (a separate head, or the embeddings when tied)."""
    llm, reference = models
    if tied:
        reference = write_checkpoint(tmp_path, CONFIGS["llama"](), seed=8)
        llm = LLM(str(tmp_path), dtype="float32", device="cpu")
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (9, 50, 3)]
    with torch.inference_mode():
        theirs = torch.stack([reference(torch.tensor([p])).logits[0, -1, [17, 250]] for p in prompts])
    torch.testing.assert_close(llm.last_token_logits(prompts, [17, 250]), theirs, atol=1e-4, rtol=0)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_last_token_logits_agree_with_the_whole_head_on_the_embedded_model(smollm2_gguf):
    """Whatever form the head has (a GGUF file's, kept as stored), the chosen columns are the whole head's."""
    llm = LLM(str(smollm2_gguf), dtype="float32", device="cpu")
    prompt = llm.tokenizer.encode("Is Paris the capital of France? Answer yes or no.")
    answers = [llm.tokenizer.encode(word)[0] for word in ("yes", "no")]
    whole = llm.engine.prompt_logits(prompt)[-1, answers]
    torch.testing.assert_close(llm.last_token_logits([prompt], answers)[0], whole, atol=1e-4, rtol=0)


def small_engine(folder, seats: int = 4, budget: int = 64) -> LLMEngine:
    loaded = load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    return LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget)))


def recorded_steps(engine: LLMEngine) -> list[list[tuple[str, int]]]:
    """Each step's batch from now on, as (request id, tokens computed) per sequence."""
    steps: list[list[tuple[str, int]]] = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        steps.append([(seq.request_id, seq.step_end - seq.num_computed) for seq in batch])
        return batch

    engine.scheduler.schedule = recording
    return steps


def run_all(engine: LLMEngine) -> dict[str, list]:
    """Every step's outputs per request until the engine is idle."""
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_pooling_prompts_share_steps_with_a_decoding_request(checkpoint, pooling):
    """Six prompts (one longer than a step's 64 tokens) on 4 seats, beside a request that decodes: they join the
    same steps, never more sequences or tokens than the step's bounds, the long one in chunks; transformers' rows,
    and the decoding request's tokens are those it gets alone."""
    folder, reference = checkpoint
    engine = small_engine(folder)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    chat = torch.randint(0, 320, (11,), generator=torch.Generator().manual_seed(9)).tolist()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (37, 5, 120, 1, 20, 9)]
    engine.add_request("chat", chat, greedy)
    engine.step()
    steps = recorded_steps(engine)
    engine.add_pooling("embed", prompts, PoolingTask.embed(pooling))
    outputs = run_all(engine)
    [pooled] = outputs["embed"]
    theirs = torch.stack([expected(reference, p, pooling) for p in prompts])
    torch.testing.assert_close(pooled.pooled, theirs, atol=ATOL, rtol=0)
    assert pooled.finished and pooled.num_prompt_tokens == sum(map(len, prompts))
    assert any({"chat", "embed/0"} <= {rid for rid, _ in step} for step in steps)  # a decode beside pooling rows
    assert all(len(step) <= 4 and sum(n for _, n in step) <= 64 for step in steps)
    assert sum(1 for step in steps for rid, _ in step if rid == "embed/2") >= 2  # 120 tokens in chunks
    alone = LLM(str(folder), dtype="float32", device="cpu").generate([chat], greedy)[0].token_ids
    assert [t for out in outputs["chat"] for t in out.new_token_ids] == alone[1:]
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.running


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_preempted_pooling_prompt_starts_over(checkpoint, pooling):
    """A prompt preempted after its first chunk is computed again from the start: what it had gathered is not
    counted twice."""
    folder, reference = checkpoint
    engine = small_engine(folder)
    prompt = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(6)).tolist()
    engine.add_pooling("embed", [prompt], PoolingTask.embed(pooling))
    assert engine.step() == []
    [seq] = engine.scheduler.running
    assert seq.num_computed == 64
    engine.scheduler._preempt(seq)
    [out] = run_all(engine)["embed"]
    torch.testing.assert_close(out.pooled[0], expected(reference, prompt, pooling), atol=ATOL, rtol=0)


def test_an_aborted_pooling_request_gives_back_its_seats_and_blocks(checkpoint):
    folder, _ = checkpoint
    engine = small_engine(folder)
    prompts = [[5] * 100, [6] * 100, *[[7] * 10] * 6]
    engine.add_pooling("embed", prompts, PoolingTask.embed("mean"))
    assert engine.step() == []  # two short prompts done, two long ones in their first chunk, four not yet admitted
    assert [seq.request_id for seq in engine.scheduler.running] == ["embed/0", "embed/1"]
    assert engine.abort("embed")
    assert not engine.has_unfinished() and engine.step() == []
    assert engine.blocks.num_free == engine.blocks.num_blocks


def queued_together(engine: AsyncEngine, calls: list) -> list:
    """Each of ``calls`` (coroutine functions of the engine) queued while the engine thread is held busy, then
    released at once; their results (or exceptions)."""
    async def main():
        busy, release = threading.Event(), threading.Event()
        holding = asyncio.ensure_future(engine.call(lambda _: busy.set() or release.wait(60)))
        await asyncio.get_running_loop().run_in_executor(None, busy.wait, 60)
        tasks = [asyncio.ensure_future(call(engine)) for call in calls]
        while engine._inbox.qsize() < len(tasks):  # every request queued behind the held engine thread
            await asyncio.sleep(0.01)
        release.set()
        await holding
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


async def generated(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return [t async for out in engine.generate("chat", prompt, params) for t in out.new_token_ids]


def test_pooling_requests_through_the_async_engine_run_together_and_fail_alone(checkpoint):
    """Embedding and rerank requests queued together with a chat request share its steps; each is answered
    with its own rows, transformers' values; one that cannot run fails alone."""
    folder, reference = checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu")
    steps = recorded_steps(llm.engine)
    generator = torch.Generator().manual_seed(5)
    requests = [[torch.randint(0, 320, (n,), generator=generator).tolist() for n in lengths]
                for lengths in ((12,), (40, 7), (3,), (25, 25, 2))]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    chat = requests[0][0]
    calls = [*(lambda engine, prompts=prompts: engine.embed(prompts, "last") for prompts in requests),
             lambda engine: engine.embed([[1, 10**6]], "last"),
             lambda engine: engine.last_token_logits(requests[1], [17, 250]),
             lambda engine: generated(engine, chat, greedy)]
    engine = AsyncEngine(llm.engine)
    try:
        *vectors, invalid, judged, tokens = queued_together(engine, calls)
    finally:
        engine.shutdown()
    assert isinstance(invalid, InvalidRequestError)
    for prompts, rows in zip(requests, vectors, strict=True):
        theirs = torch.stack([expected(reference, p, "last") for p in prompts])
        torch.testing.assert_close(rows, theirs, atol=ATOL, rtol=0)
    with torch.inference_mode():
        theirs = torch.stack([reference(torch.tensor([p])).logits[0, -1, [17, 250]] for p in requests[1]])
    torch.testing.assert_close(judged, theirs, atol=1e-4, rtol=0)
    assert tokens == LLM(str(folder), dtype="float32", device="cpu").generate([chat], greedy)[0].token_ids
    assert len(steps[0]) == 1 + sum(map(len, requests)) + len(requests[1])  # the chat prompt and every pooled one
