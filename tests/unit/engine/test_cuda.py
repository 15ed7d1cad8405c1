"""The reference checks on CUDA (skipped without a GPU). Tolerances: fp32 with TF32 off, logits within 1e-3 of the
CPU-recorded oracles (different summation orders); bf16, logits within 0.3 (an 8-bit mantissa on logits of
magnitude ~10) and greedy tokens compared only where fp32 is exact. With flash-attn installed, bf16 runs on its
varlen kernel, and that path must give the tokens of the padded SDPA path."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.kernels.flash import flash_kernel
from engine.weights.loader import load_model
from tests.conftest import load_fixture
from tests.unit.engine.conftest import QWEN1_MODEL
from tests.unit.engine.test_quantized import CHECKPOINTS, QUANT, reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CASES = load_fixture("qwen1/cases.json")["cases"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def llm(request) -> LLM:
    return LLM(str(QWEN1_MODEL), dtype=request.param, device="cuda")


def test_qwen1_logits_on_cuda(llm, qwen1_logits):
    atol = 1e-3 if llm.engine.dtype == torch.float32 else 0.3
    for case in CASES:
        logits = llm.engine.prompt_logits(case["prompt_ids"]).cpu()
        torch.testing.assert_close(logits, qwen1_logits[case["prompt_logits_key"]], atol=atol, rtol=1e-3)


def test_qwen1_greedy_and_batch_rows_on_cuda(llm):
    if llm.engine.dtype != torch.float32:
        pytest.skip("greedy tokens are compared in fp32")
    prompts = [c["prompt_ids"] for c in CASES]
    together = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == [c["new_ids"] for c in CASES]
    assert together == [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_quantized_checkpoints_on_cuda(name):
    loaded = load_model(str(QUANT / name), dtype=torch.float32, device=torch.device("cuda"))
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=64 << 20))
    ref = reference(name)
    for k in range(3):
        logits = engine.prompt_logits(ref[f"prompt.{k}"].tolist()).cpu()
        torch.testing.assert_close(logits, ref[f"logits.{k}"], atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(flash_kernel() is None, reason="needs flash-attn")
def test_flash_varlen_path_gives_the_tokens_of_the_sdpa_path():
    flash = LLM(str(QWEN1_MODEL), dtype="bfloat16", device="cuda")
    sdpa = LLM(str(QWEN1_MODEL), dtype="bfloat16", device="cuda")
    sdpa.engine.runner.model.use_varlen_attention(None)
    assert flash.engine.runner.model.uses_varlen and not sdpa.engine.runner.model.uses_varlen
    prompts = [c["prompt_ids"] for c in CASES]
    for prompt in prompts:
        torch.testing.assert_close(flash.engine.prompt_logits(prompt), sdpa.engine.prompt_logits(prompt),
                                   atol=0.1, rtol=1e-2)
    assert ([o.token_ids for o in flash.generate(prompts, GREEDY)]
            == [o.token_ids for o in sdpa.generate(prompts, GREEDY)])


def test_seeded_sampling_with_penalties_on_cuda(llm):
    if llm.engine.dtype != torch.float32:
        pytest.skip("batch compositions are compared in fp32")
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=20, min_p=0.02, repetition_penalty=1.1,
                            presence_penalty=0.3, frequency_penalty=0.2, logit_bias={5: 2.0}, seed=7, logprobs=2,
                            max_tokens=16)
    prompts = [c["prompt_ids"] for c in CASES]
    alone = llm.generate([prompts[0]], params)[0]
    crowd = llm.generate(prompts, [params] + [SamplingParams(temperature=1.0, max_tokens=16)] * (len(prompts) - 1))
    assert crowd[0].token_ids == alone.token_ids and len(alone.token_ids) == 16
    assert all(token in entry and len(entry) >= 2 for token, entry in zip(alone.token_ids, alone.logprobs,
                                                                          strict=True))
