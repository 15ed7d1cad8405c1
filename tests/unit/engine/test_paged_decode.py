"""The CUDA decode path, on CPU: the Triton paged-decode kernel (under ``TRITON_INTERPRET=1`` where there is no GPU)
against fp64 attention, and the Qwen-1 reference model decoding through it, eagerly and through the fixed-shape
step that CUDA graphs capture (padding rows in the scratch page, full-width block tables), against the oracles."""

from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.cuda_graphs import CudaGraphCapture, DecodeGraphs
from engine.kernels import triton_decode
from engine.kernels.triton_decode import TILE, TritonPagedAttention
from engine.kv_store import LayerCache
from tests.conftest import load_fixture
from tests.unit.engine.conftest import QWEN1_MODEL, decode_alone
from tests.unit.engine.test_models_vs_transformers import CONFIGS, write_checkpoint

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it
CASES = load_fixture("qwen1/cases.json")["cases"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 16
LOGITS_ATOL = 1e-4 if DEVICE.type == "cpu" else 1e-3  # the CUDA tests' bound: other summation orders, TF32 off
EIGHT_BIT_LOGITS_ATOL = 1e-2  # one 8-bit rounding step flipped by float rounding below it (see the 8-bit test)


@pytest.fixture(autouse=True)
def two_shares_under_the_interpreter(monkeypatch):
    """The interpreter runs a grid one program at a time, so on CPU the model-level tests split each head's keys in
    at most two shares (the kernel test below covers 1, 2 and 16)."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(triton_decode, "MAX_SPLITS", 2)


def reference_attention(q: torch.Tensor, cache: LayerCache, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """fp64 softmax(q k^T / sqrt(D)) v over each row's keys (as the cache means them), looked up page by page."""
    heads, kv_heads, dim = q.shape[1], cache.k.shape[1], q.shape[2]
    rows = []
    for row, length in enumerate(lens.tolist()):
        position = torch.arange(length)
        slots = tables[row].long().cpu()[position // BLOCK] * BLOCK + position % BLOCK
        keys, values = cache.read(slots, torch.float64) if cache.quantized else (cache.k[slots], cache.v[slots])
        keys = keys.double().repeat_interleave(heads // kv_heads, dim=1)
        values = values.double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,khd->hk", q[row].cpu().double(), keys) / dim**0.5
        rows.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(rows)


def on_device(cache: LayerCache) -> LayerCache:
    return LayerCache(*(None if t is None else t.to(DEVICE) for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)))


@pytest.mark.parametrize("eight_bit", [None, torch.int8, torch.float8_e4m3fn], ids=["model-dtype", "int8", "fp8"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("heads,kv_heads,dim,programs", [(4, 4, 16, triton_decode.TARGET_PROGRAMS), (8, 2, 64, 80),
                                                         (4, 1, 128, 1)])
def test_kernel_matches_fp64_attention_over_scattered_pages(dtype, bound, heads, kv_heads, dim, programs, eight_bit,
                                                            monkeypatch):
    """Lengths of one key, around a tile edge and over several tiles; pages in random order; a cache in the queries'
    dtype, or int8 or fp8 with a scale per slot and head (the CPU layout); keys split in 16, 2 or 1 shares; relative
    error against fp64 attention over what the cache holds: under 1e-6 for fp32 queries, 2^-8 (the output rounding)
    for bf16."""
    monkeypatch.setattr(triton_decode, "TARGET_PROGRAMS", programs)
    monkeypatch.setattr(triton_decode, "MAX_SPLITS", 16)
    generator = torch.Generator().manual_seed(heads * dim)
    lens = torch.tensor([1, TILE - 1, TILE, TILE + 1, 3 * TILE + 7], dtype=torch.int32)
    pages = 40
    tables = torch.stack([torch.randperm(pages, generator=generator)[:16] for _ in lens]).int()
    if eight_bit == torch.int8:
        rows = [torch.randint(-127, 128, (pages * BLOCK, kv_heads, dim), dtype=torch.int8, generator=generator)
                for _ in range(2)]
        cache = LayerCache(*rows, *(torch.rand(pages * BLOCK, kv_heads, generator=generator) * 0.02 for _ in "kv"))
    elif eight_bit is not None:
        rows = [(torch.randn(pages * BLOCK, kv_heads, dim, generator=generator) * 50).to(eight_bit) for _ in "kv"]
        cache = LayerCache(*rows, *(torch.rand(pages * BLOCK, kv_heads, generator=generator) * 0.02 for _ in "kv"))
    else:
        cache = LayerCache(*(torch.randn(pages * BLOCK, kv_heads, dim, generator=generator).to(dtype) for _ in "kv"))
    q = torch.randn(len(lens), heads, dim, generator=generator).to(dtype)
    kernel = TritonPagedAttention(heads, kv_heads, dim, BLOCK)
    out = kernel(q.to(DEVICE), on_device(cache), tables.to(DEVICE), lens.to(DEVICE))
    expected = reference_attention(q, cache, tables, lens)
    assert out.dtype == dtype and out.shape == (len(lens), heads * dim)
    assert ((out.cpu().double() - expected).norm() / expected.norm()).item() < bound


def paged_qwen1(kv_cache_dtype: str = "auto") -> LLM:
    """The fp32 Qwen-1 reference model on ``DEVICE`` with the CUDA step's Triton kernels: decode on the paged
    kernel, every step's RoPE, logN and cache write on the fused kernel, RMSNorm and SwiGLU on theirs (no graphs:
    they are set up by each test)."""
    llm = LLM(str(QWEN1_MODEL), dtype="float32", device=DEVICE,
              config=EngineConfig(enforce_eager=True, kv_cache_dtype=kv_cache_dtype))
    llm.engine.runner.model.use_triton_kernels(BLOCK)
    return llm


@pytest.fixture(scope="module")
def paged_llm() -> LLM:
    return paged_qwen1()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_paged_decode_gives_the_oracle_logits_and_tokens(qwen1_logits, case):
    """Every decode step through the kernel (Qwen-1's logN and dynamic NTK included), within the reference tests'
    1e-4 of the recorded logits (CUDA: 1e-3)."""
    engine = paged_qwen1().engine
    layer = engine.runner.model.layers[0]
    assert engine.runner.model.uses_paged_decode and layer.attn.rope_store is not None
    assert layer.attn_norm.triton and layer.mlp.triton
    tokens, logits = decode_alone(engine, case["prompt_ids"], GREEDY)
    assert tokens == case["new_ids"]
    torch.testing.assert_close(logits.cpu(), qwen1_logits[case["decode_logits_key"]], atol=LOGITS_ATOL,
                               rtol=0)


def test_the_captured_step_with_padding_rows_gives_every_row_its_tokens(paged_llm):
    """Six prompts in a bucket of eight (two padding rows writing the scratch page), tables at full width: each
    row's tokens are the oracle's, and the same when the rows run one at a time (bucket 1). On CUDA the steps are
    captured graphs, replayed."""
    engine = paged_llm.engine
    graphs = DecodeGraphs(engine.runner, max_rows=8, max_model_len=engine.max_model_len,
                          capture=CudaGraphCapture(DEVICE) if DEVICE.type == "cuda" else None)
    engine.runner.use_decode_graphs(graphs)
    try:
        assert graphs.buckets == [1, 2, 4, 8] and graphs.width * BLOCK > engine.max_model_len
        together = [o.token_ids for o in paged_llm.generate([c["prompt_ids"] for c in CASES], GREEDY)]
        assert together == [c["new_ids"] for c in CASES]
        assert paged_llm.generate([CASES[3]["prompt_ids"]], GREEDY)[0].token_ids == CASES[3]["new_ids"]
        assert graphs.captured == ([1, 8] if DEVICE.type == "cuda" else [])
    finally:
        engine.runner.use_decode_graphs(None)


def test_decode_graphs_take_decode_steps_of_at_most_the_largest_bucket(paged_llm):
    engine = paged_llm.engine
    graphs = DecodeGraphs(engine.runner, max_rows=3, max_model_len=engine.max_model_len)
    assert graphs.buckets == [1, 2, 3]
    for index, case in enumerate(CASES[:4]):
        engine.add_request(str(index), case["prompt_ids"], GREEDY)
    batch = engine.scheduler.schedule()
    assert not graphs.fits(batch)  # prefill
    engine.runner.run(batch)
    for seq in batch:
        seq.num_computed = len(seq)
        seq.output_ids.append(1)
    assert graphs.fits(batch[:3]) and not graphs.fits(batch)
    for index in range(4):
        engine.abort(str(index))


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_an_8bit_cache_decodes_alike_through_the_kernel_and_the_padded_path(kv_cache_dtype):
    """The kernel's 8-bit reads against the padded path's dequantized gather over caches written by the same code
    (the fused kernel, or torch ops for fp8 under the interpreter, whose fp8 conversion is wrong): the same tokens
    for two fixture prompts (contexts of 4 and 8 pages), and decode logits within 1e-2. Not the fp32 bound: the two
    paths' float rounding (~1e-6) below a cache write can put an element on the other side of an 8-bit rounding
    boundary, one step (1/127 of the row's peak) apart, which moves a logit by up to a few 1e-3 (seen: 3.3e-3). The
    kernel's own reads are held to the fp32 bound by the kernel test above."""
    eight_bit = EngineConfig(enforce_eager=True, kv_cache_dtype=kv_cache_dtype)
    padded = LLM(str(QWEN1_MODEL), dtype="float32", device=DEVICE, config=eight_bit)
    padded.engine.runner.model.use_triton_kernels(BLOCK)
    padded.engine.runner.model.use_paged_decode(None)  # the same writes, norms and activations: only reads differ
    paged = paged_qwen1(kv_cache_dtype=kv_cache_dtype)
    if kv_cache_dtype == "fp8" and DEVICE.type == "cpu":
        for llm in (padded, paged):
            llm.engine.runner.model.use_rope_store(None)
    for case in (CASES[3], CASES[5]):  # 31 and 90 prompt tokens
        tokens, logits = decode_alone(paged.engine, case["prompt_ids"], GREEDY)
        reference_tokens, reference_logits = decode_alone(padded.engine, case["prompt_ids"], GREEDY)
        assert tokens == reference_tokens
        torch.testing.assert_close(logits, reference_logits, atol=EIGHT_BIT_LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gqa_and_head_norm_checkpoints_decode_through_the_kernels_as_transformers(tmp_path, arch):
    """A GQA Qwen2 (q/k/v biases) and a Qwen3 (head norms) on the CUDA step's Triton kernels: greedy tokens of
    transformers, alone and batched with shorter prompts."""
    reference = write_checkpoint(tmp_path, CONFIGS[arch](), seed=3)
    llm = LLM(str(tmp_path), dtype="float32", device=DEVICE, config=EngineConfig(enforce_eager=True))
    llm.engine.runner.model.use_triton_kernels(BLOCK)
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [prompt, prompt[:23], prompt[:7]]
    with torch.inference_mode():
        expected = [reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                       pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt], params)[0].token_ids == expected[0]
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
