"""Prompt passes against transformers on a tiny random Qwen3 (the Qwen3-Embedding and Qwen3-Reranker shape), fp32:
pooled embeddings (``LLMEngine.embed``: final hidden states after the final norm pooled by the last token, the mean
or the first, L2-normalised), each prompt alone and packed with others of other lengths in one pass; and chosen
tokens' logits at each prompt's last position (``last_token_logits``)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers

from engine import LLM, AsyncEngine
from engine.engine import InvalidRequestError
from tests.unit.engine.test_models_vs_transformers import CONFIGS, write_checkpoint

ATOL = 1e-5  # fp32, the bound on an embedding's every component


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[LLM, transformers.PreTrainedModel]:
    folder = tmp_path_factory.mktemp("qwen3-embedding")
    reference = write_checkpoint(folder, CONFIGS["qwen3"](), seed=7)
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
    packed = llm.engine.embed(prompts, pooling)
    alone = torch.cat([llm.engine.embed([p], pooling) for p in prompts])
    torch.testing.assert_close(packed, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(alone, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.norm(dim=-1), torch.ones(len(prompts)), atol=1e-6, rtol=0)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks  # nothing kept after the pass


def test_prompts_it_cannot_run_are_refused(models):
    llm, _ = models
    for prompts, pooling in (([[]], "last"), ([[1, 10**6]], "last"), ([[1]], "max")):
        with pytest.raises(InvalidRequestError):
            llm.engine.embed(prompts, pooling)
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
    torch.testing.assert_close(llm.engine.last_token_logits(prompts, [17, 250]), theirs, atol=1e-4, rtol=0)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_last_token_logits_agree_with_the_whole_head_on_the_embedded_model(smollm2_gguf):
    """Whatever form the head has (a GGUF file's, kept as stored), the chosen columns are the whole head's."""
    llm = LLM(str(smollm2_gguf), dtype="float32", device="cpu")
    prompt = llm.tokenizer.encode("Is Paris the capital of France? Answer yes or no.")
    answers = [llm.tokenizer.encode(word)[0] for word in ("yes", "no")]
    whole = llm.engine.prompt_logits(prompt)[-1, answers]
    torch.testing.assert_close(llm.engine.last_token_logits([prompt], answers)[0], whole, atol=1e-4, rtol=0)


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


@pytest.mark.parametrize("with_invalid", [False, True], ids=["valid", "one-invalid"])
def test_pooling_requests_queued_together_share_a_pass_and_fail_alone(models, with_invalid):
    """Requests queued while the engine thread is busy are packed into one pass per kind (embeddings with one
    pooling; a reranker's logits), each answered with its own rows, transformers' values; with one that cannot run
    in the pass, each runs alone, so only that one gets the error."""
    llm, reference = models
    passes: list[tuple[str, int]] = []
    embed, logits = llm.engine.embed, llm.engine.last_token_logits

    def counted(kind, method):
        def run(prompts, argument):
            passes.append((kind, len(prompts)))
            return method(prompts, argument)
        return run

    generator = torch.Generator().manual_seed(5)
    requests = [[torch.randint(0, 320, (n,), generator=generator).tolist() for n in lengths]
                for lengths in ((12,), (40, 7), (3,), (25, 25, 2))]
    embedded = [*requests, *([[[1, 10**6]]] if with_invalid else [])]
    calls = [*(lambda engine, prompts=prompts: engine.embed(prompts, "last") for prompts in embedded),
             lambda engine: engine.last_token_logits(requests[1], [17, 250])]
    llm.engine.embed, llm.engine.last_token_logits = counted("embed", embed), counted("logits", logits)
    engine = AsyncEngine(llm.engine)
    try:
        *vectors, judged = queued_together(engine, calls)
    finally:
        engine.shutdown()
        llm.engine.embed, llm.engine.last_token_logits = embed, logits
    together = ("embed", sum(map(len, embedded)))
    alone = [("embed", len(prompts)) for prompts in embedded] if with_invalid else []
    assert passes == [together, *alone, ("logits", 2)]
    if with_invalid:
        assert isinstance(vectors.pop(), InvalidRequestError)
    for prompts, rows in zip(requests, vectors, strict=True):
        theirs = torch.stack([expected(reference, p, "last") for p in prompts])
        torch.testing.assert_close(rows, theirs, atol=ATOL, rtol=0)
    with torch.inference_mode():
        theirs = torch.stack([reference(torch.tensor([p])).logits[0, -1, [17, 250]] for p in requests[1]])
    torch.testing.assert_close(judged, theirs, atol=1e-4, rtol=0)
