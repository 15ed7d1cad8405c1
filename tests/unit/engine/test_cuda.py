"""The reference checks on CUDA (skipped without a GPU). Tolerances: fp32 with TF32 off, logits within 1e-3 of the
CPU-recorded oracles (different summation orders); bf16, the logits' relative error (norm of the difference over
the oracle's) under five of bf16's unit roundoff (a single logit of magnitude ~10 moved by 0.36 on an H200),
and greedy tokens compared only where fp32 is exact. With flash-attn installed, bf16 runs on its
varlen kernel, and that path must give the tokens of the padded SDPA path."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.kernels.flash import flash_kernel
from engine.layers import CudaInt4Linear, TritonInt4Linear
from engine.weights.int4 import CUDA_INT4, TRITON_INT4
from engine.weights.loader import int4_kernel_for, load_model
from tests.conftest import load_fixture
from tests.unit.engine.conftest import QWEN1_MODEL
from tests.unit.engine.test_models_vs_transformers import CONFIGS, write_checkpoint
from tests.unit.engine.test_quantized import CHECKPOINTS, QUANT, logit_error, reference
from tests.unit.engine.test_triton_int4 import random_int4

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CASES = load_fixture("qwen1/cases.json")["cases"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)
# ||logits - fp32 oracle|| / ||oracle||: five of bf16's unit roundoff (2^-8); an H200 measured 0.011 (bf16 head,
# bf16 layers; the CPU path keeps an fp32 head)
BF16_RELATIVE_ERROR = 5 * 2**-8
# fp32 on the card (TF32 off) against the CPU references: only the order of the sums differs, which the fixtures put
# at 2e-5 on these logits; the bound is absolute (rtol 0), fifty times that
FP32_ATOL = 1e-3


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
    for case in CASES:
        logits = llm.engine.prompt_logits(case["prompt_ids"]).cpu()
        expected = qwen1_logits[case["prompt_logits_key"]]
        if llm.engine.dtype == torch.float32:
            torch.testing.assert_close(logits, expected, atol=FP32_ATOL, rtol=0)
        else:
            assert ((logits - expected).norm() / expected.norm()).item() < BF16_RELATIVE_ERROR


def test_qwen1_greedy_and_batch_rows_on_cuda(llm):
    if llm.engine.dtype != torch.float32:
        pytest.skip("greedy tokens are compared in fp32")
    prompts = [c["prompt_ids"] for c in CASES]
    together = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == [c["new_ids"] for c in CASES]
    assert together == [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe", "llama"])
def test_tiny_random_checkpoints_on_cuda_match_transformers(tmp_path, arch):
    """Qwen3's head norms, routed experts (eager) and GQA on the CUDA path (paged decode kernel, CUDA graphs for
    the dense ones): fp32 prompt logits within 1e-3 of transformers on the CPU, greedy tokens identical alone and
    batched."""
    reference = write_checkpoint(tmp_path, CONFIGS[arch](), seed=3)
    llm = LLM(str(tmp_path), dtype="float32", device="cuda")
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        expected_logits = reference(torch.tensor([prompt])).logits[0]
        expected = [reference.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                       pad_token_id=0)[0, len(p):].tolist() for p in (prompt, prompt[:23], prompt[:7])]
    torch.testing.assert_close(llm.engine.prompt_logits(prompt).cpu(), expected_logits, atol=FP32_ATOL, rtol=0)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert llm.generate([prompt], params)[0].token_ids == expected[0]
    assert [o.token_ids for o in llm.generate([prompt, prompt[:23], prompt[:7]], params)] == expected


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_quantized_checkpoints_on_cuda(name):
    loaded = load_model(str(QUANT / name), dtype=torch.float32, device=torch.device("cuda"))
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=64 << 20))
    ref = reference(name)
    for k in range(3):
        logits = engine.prompt_logits(ref[f"prompt.{k}"].tolist()).cpu()
        torch.testing.assert_close(logits, ref[f"logits.{k}"], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_cuda_int4_linear_computes_its_dequantized_weight(group_size, rows):
    """tinygemm on the packed layout against fp64 x @ W^T, W dequantized with the bf16 scales and offsets it
    reads: relative error of bf16 activations and accumulation (under 1e-2); a wrong nibble order or group
    mapping gives ~1."""
    generator = torch.Generator().manual_seed(rows)
    weight = random_int4(256, 512, group_size, seed=rows * group_size)
    assert weight.fits_cuda()
    packed, scales_and_zeros = weight.pack_for_cuda(torch.device("cuda"))
    linear = CudaInt4Linear(packed, scales_and_zeros, group_size, 256, None)
    x = torch.randn(rows, 512, generator=generator).to(torch.bfloat16)
    sz = scales_and_zeros.double().cpu()  # [groups, out, 2]
    groups = (weight.q.double() - 8).view(256, -1, group_size)
    dense = (groups * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(256, 512)
    expected = x.double() @ dense.T
    y = torch.full((rows, 256), float("nan"), dtype=torch.bfloat16, device="cuda")
    y.copy_(linear(x.cuda()))
    assert torch.isfinite(y).all()
    assert ((y.double().cpu() - expected).norm() / expected.norm()).item() < 1e-2


def test_int4_kernel_choice_on_this_card():
    device = torch.device("cuda")
    assert int4_kernel_for(device, torch.bfloat16) == (CUDA_INT4 if torch.cuda.get_device_capability() >= (8, 0)
                                                      else TRITON_INT4)
    assert int4_kernel_for(device, torch.float16) == TRITON_INT4
    assert int4_kernel_for(device, torch.float32) is None


@pytest.mark.parametrize("kernel,linear", [(CUDA_INT4, CudaInt4Linear), (TRITON_INT4, TritonInt4Linear)])
@pytest.mark.parametrize("name,packed", [("gptq-4bit-g128", True), ("awq-4bit-g128-gemm", True),
                                         ("gptq-4bit-g128-actorder", True), ("gptq-8bit-g128", False)])
def test_bf16_int4_checkpoints_stay_packed_on_cuda(kernel, linear, name, packed):
    """4-bit checkpoints keep their weights at 4 bits on either CUDA kernel; logits within the bf16 tolerance of
    the fp32 reference (the CPU int4 test's 0.3)."""
    loaded = load_model(str(QUANT / name), dtype=torch.bfloat16, device=torch.device("cuda"), int4_kernel=kernel)
    assert any(isinstance(m, linear) for m in loaded.model.modules()) == packed
    assert logit_error(loaded, name) < 0.3


@pytest.mark.skipif(flash_kernel() is None, reason="needs flash-attn")
def test_flash_varlen_path_gives_the_tokens_of_the_sdpa_path():
    flash = LLM(str(QWEN1_MODEL), dtype="bfloat16", device="cuda")
    sdpa = LLM(str(QWEN1_MODEL), dtype="bfloat16", device="cuda")
    sdpa.engine.runner.model.use_varlen_attention(None)
    assert flash.engine.runner.model.uses_varlen(2) and not sdpa.engine.runner.model.uses_varlen(2)
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
