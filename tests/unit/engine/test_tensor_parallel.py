"""Tensor parallelism on the CPU: 2 processes over gloo, fp32. The split model against the recorded Qwen-1 oracles
(NTK and logN prompts included) and against the same model unsplit; GQA with KV heads split and replicated; the
real Qwen vocabulary split over the ranks; a model whose heads do not divide refused; each rank's slices."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.parallel import Shard
from engine.pooling import PoolingTask
from tests.conftest import load_fixture
from tests.integration.conftest import write_tiny_qwen1
from tests.unit.engine.conftest import QWEN1_MODEL
from tests.unit.engine.gguf_export import write_gguf
from tests.unit.engine.test_models_vs_transformers import CONFIGS, write_checkpoint

CASES = load_fixture("qwen1/cases.json")["cases"]
BATCH = load_fixture("qwen1/batch.json")
GREEDY = SamplingParams(temperature=0, max_tokens=24)
ATOL = 1e-4  # fp32 logits: README's bound, absolute (rtol 0)


def split(path: str, ranks: int = 2) -> LLM:
    return LLM(path, dtype="float32", device="cpu", tensor_parallel_size=ranks)


class TestSplitQwen1:
    """One split engine for these tests (a process joins one group at a time), closed after them."""

    @pytest.fixture(scope="class")
    @classmethod
    def qwen1_split(cls):
        llm = split(str(QWEN1_MODEL))
        yield llm
        llm.engine.close()

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
    def test_it_matches_the_original_code(self, qwen1_split, qwen1_logits, case):
        logits = qwen1_split.engine.prompt_logits(case["prompt_ids"])
        torch.testing.assert_close(logits, qwen1_logits[case["prompt_logits_key"]], atol=ATOL, rtol=0)
        assert qwen1_split.generate([case["prompt_ids"]], GREEDY)[0].token_ids == case["new_ids"]

    def test_it_batches_like_its_solo_runs(self, qwen1_split):
        for group in BATCH["groups"]:
            params = SamplingParams(temperature=0, max_tokens=group["n_new"])
            outputs = qwen1_split.generate([row["prompt_ids"] for row in group["rows"]], params)
            assert [o.token_ids for o in outputs] == [row["solo_new_ids"] for row in group["rows"]]

    def test_prompt_logprobs_are_those_of_the_whole_model(self, qwen1_split):
        whole = LLM(str(QWEN1_MODEL), dtype="float32", device="cpu")
        prompt = CASES[3]["prompt_ids"]
        ours, theirs = qwen1_split.engine.prompt_logprobs(prompt, 3), whole.engine.prompt_logprobs(prompt, 3)
        assert [None if e is None else sorted(e) for e in ours] == [None if e is None else sorted(e) for e in theirs]
        for mine, reference in zip(ours[1:], theirs[1:], strict=True):
            assert all(abs(mine[t] - reference[t]) <= 1e-4 for t in reference)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: 2 KV heads split; llama: 1 KV head replicated
def test_split_gqa_models_match_the_whole(tmp_path, arch):
    write_checkpoint(tmp_path, CONFIGS[arch](), seed=7)
    whole, halves = LLM(str(tmp_path), dtype="float32", device="cpu"), split(str(tmp_path))
    try:
        prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 9)]
        torch.testing.assert_close(halves.engine.prompt_logits(prompts[0]), whole.engine.prompt_logits(prompts[0]),
                                   atol=ATOL, rtol=0)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        assert [o.token_ids for o in halves.generate(prompts, params)] == \
            [o.token_ids for o in whole.generate(prompts, params)]
        kv_heads = CONFIGS[arch]().num_key_value_heads
        assert halves.engine.model_config.num_kv_heads == max(1, kv_heads // 2)
        split_run, whole_run = (beside_pooling(llm, prompts, params) for llm in (halves, whole))
        assert split_run[0] == whole_run[0]
        for ours, theirs in zip(split_run[1:], whole_run[1:], strict=True):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    finally:
        halves.engine.close()


def beside_pooling(llm: LLM, prompts: list[list[int]], params: SamplingParams
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A request's tokens generated in the same steps as a reranker's logits and mean-pooled embeddings of
    ``prompts``, and those two results."""
    engine = llm.engine
    engine.add_request("chat", prompts[1], params)
    engine.add_pooling("judge", prompts, PoolingTask.logits((17, 250)))
    engine.add_pooling("embed", prompts, PoolingTask.embed("mean"))
    tokens, pooled = [], {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            if out.pooled is not None:
                pooled[out.request_id] = out.pooled
    return tokens, pooled["judge"], pooled["embed"]


def test_the_real_qwen_vocabulary_split_over_two_ranks(tmp_path, qwen_vocab_path):
    folder = write_tiny_qwen1(tmp_path / "qwen1", qwen_vocab_path)
    whole, halves = LLM(str(folder), dtype="float32", device="cpu"), split(str(folder))
    try:
        assert halves.engine.runner.model.embed.shape[0] == 151936 // 2
        text = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"
        ids = whole.tokenizer.encode(text, allow_special=True)
        torch.testing.assert_close(halves.engine.prompt_logits(ids), whole.engine.prompt_logits(ids), atol=ATOL,
                                   rtol=0)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        assert halves.generate([ids], params)[0].token_ids == whole.generate([ids], params)[0].token_ids
    finally:
        halves.engine.close()


def test_a_model_whose_heads_do_not_divide_is_refused(smollm2_gguf):
    with pytest.raises(ValueError, match="9 attention heads do not divide by 2; 3 KV heads neither divide"):
        split(str(smollm2_gguf))


def test_each_rank_holds_its_slices():
    """Qwen2-7B-like shapes with 4 query and 2 KV heads a rank at 2 ranks, and KV heads replicated at 8 ranks."""
    from engine.config import ModelConfig

    config = ModelConfig(arch="qwen2", vocab_size=10, hidden_size=8, num_layers=1, num_heads=8, num_kv_heads=4,
                         head_dim=2, intermediate_size=6, rms_norm_eps=1e-6, rope_theta=1e4, max_model_len=16,
                         qkv_bias=True, tie_word_embeddings=False)
    rows = torch.arange(16 + 8 + 8)[:, None].float()
    second = Shard(1, 2)
    q, k, v = second.slice("qkv", rows, config).flatten().split([8, 4, 4])
    assert q.tolist() == list(range(8, 16)) and k.tolist() == list(range(20, 24)) and v.tolist() == list(range(28, 32))
    assert second.slice("o", torch.arange(16)[None], config).tolist() == [list(range(8, 16))]
    assert second.slice("down", torch.arange(6)[None], config).tolist() == [[3, 4, 5]]
    assert second.vocab_rows(10) == (5, 10) and Shard(2, 3).vocab_rows(10) == (8, 10)
    kv_rows = [Shard(r, 8).span("kv", config) for r in range(8)]  # 4 KV heads over 8 ranks: two ranks share one
    assert kv_rows == [(0, 2), (0, 2), (2, 4), (2, 4), (4, 6), (4, 6), (6, 8), (6, 8)]
    assert Shard(3, 8).span("q", config) == (6, 8) and kv_rows[3] == (2, 4)  # query head 3 uses KV head 1


def test_a_split_gguf_file_matches_the_whole(tmp_path):
    """GGUF tensors are dequantized whole, then cut: the same model as the unsplit file (Qwen3: q/k norms too)."""
    reference = write_checkpoint(tmp_path / "hf", CONFIGS["qwen3"](), seed=9)
    path = str(write_gguf(reference, tmp_path / "model.gguf"))
    whole, halves = LLM(path, dtype="float32", device="cpu"), split(path)
    try:
        prompt = torch.randint(0, 320, (30,), generator=torch.Generator().manual_seed(3)).tolist()
        torch.testing.assert_close(halves.engine.prompt_logits(prompt), whole.engine.prompt_logits(prompt),
                                   atol=ATOL, rtol=0)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        assert halves.generate([prompt], params)[0].token_ids == whole.generate([prompt], params)[0].token_ids
    finally:
        halves.engine.close()
