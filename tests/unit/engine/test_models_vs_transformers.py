"""Our decoder against transformers on the same weights: the embedded SmolLM2 GGUF and tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.weights.gguf_tensors import GGUFTensors
from tests.unit.engine.gguf_export import write_gguf
from tokenizer import ChatMessage, build_prompt
from tokenizer.chat import builtin_template

ATOL = 1e-4  # fp32 logits: README's bound, absolute (rtol 0)


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf) -> LLM:
    return LLM(str(smollm2_gguf), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def chat_ids(llm: LLM, question: str) -> list[int]:
    return build_prompt(llm.tokenizer, [ChatMessage("user", question)]).token_ids


def test_smollm2_logits_match_transformers(smollm2_fp32, hf_smollm2):
    ids = chat_ids(smollm2_fp32, "Explain in one sentence why the sky is blue.")
    ours = smollm2_fp32.engine.prompt_logits(ids)
    with torch.inference_mode():
        theirs = hf_smollm2(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_smollm2_greedy_tokens_match_transformers(smollm2_fp32, hf_smollm2):
    ids = chat_ids(smollm2_fp32, "Write a haiku about autumn leaves.")
    ours = smollm2_fp32.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.inference_mode():
        theirs = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.token_ids == theirs[0, len(ids):].tolist()


def test_smollm2_knows_the_capital_of_france(smollm2_fp32):
    output = smollm2_fp32.generate([chat_ids(smollm2_fp32, "What is the capital of France?")],
                                   SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in output.text
    assert output.finish_reason == "stop"


# (activation dtype, cpu_isa): layer module, LM head module (None: the tied embedding), max mean KL to fp32: twice
# the largest measured over the three questions below (torch 0.0049-0.0053; native bf16 0.0207-0.0234, fp32
# 0.0200-0.0211, the same on both builds)
# nats: the token a path ranks first is never much less likely under fp32 than fp32's own first (worst measured: 1.06
# native bf16, 0.45 native fp32, 0 torch's kernel)
MAX_CHOICE_GAP = 2.0
CPU_KERNELS = {("bfloat16", "torch"): ("Int4Linear", "NoneType", 0.011),
               ("bfloat16", "avx512"): ("Q4Q8Linear", "Q8Linear", 0.047),
               ("bfloat16", "avx2"): ("Q4Q8Linear", "Q8Linear", 0.047),
               ("float32", "avx512"): ("Q4Q8Linear", "Q8Linear", 0.042),
               ("float32", "avx2"): ("Q4Q8Linear", "Q8Linear", 0.042)}


@pytest.fixture(scope="module", params=list(CPU_KERNELS), ids=["-".join(key) for key in CPU_KERNELS])
def smollm2_int4(request, smollm2_gguf) -> LLM:
    from engine.kernels import native

    dtype, isa = request.param
    if isa != "torch" and isa not in native.isas():
        pytest.skip(f"this CPU or toolchain has no {isa} build of the native kernels")
    llm = LLM(str(smollm2_gguf), dtype=dtype, device="cpu", cpu_isa=isa)
    llm.kernel = request.param
    return llm


def test_q4_weights_kept_packed_are_exactly_the_dequantized_ones(smollm2_gguf):
    tensors = GGUFTensors(smollm2_gguf)
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight"):
        assert tensors.is_int4(name)
        torch.testing.assert_close(tensors.int4(name).dequantize(), tensors.dense(name), atol=0, rtol=0)


@pytest.mark.parametrize("question", ["Name three primary colors.", "What is the capital of France?",
                                      "Which city is the capital of Germany?"])
def test_int4_paths_follow_fp32_distribution(smollm2_fp32, smollm2_int4, question):
    """The packed-int4 paths run the same Q4 weights with bf16 activations (torch's kernel) or with activations
    quantized to int8 per block of 16 and the Q8_0 head as stored (the native kernels, for each build, around a
    bf16 or an fp32 model): close to fp32, not bit-equal (near-ties such as 'The' vs 'L' 0.08 apart on the France
    question may flip; at a flat position of the chat template, fp32's fourth choice, 1.06 nats below its first,
    comes first on the native bf16 path on a Xeon with AMX)."""
    module, head, max_mean_kl = CPU_KERNELS[smollm2_int4.kernel]
    model = smollm2_int4.engine.runner.model
    assert type(model.layers[0].attn.qkv).__name__ == module
    assert type(model.lm_head).__name__ == head
    # the native kernels apply SwiGLU inside the down projection (torch's int4 kernel leaves it to torch)
    assert all(layer.mlp.activation_in_down == (module == "Q4Q8Linear") for layer in model.layers)
    ids = chat_ids(smollm2_int4, question)
    exact = smollm2_fp32.engine.prompt_logits(ids).log_softmax(-1)
    approx = smollm2_int4.engine.prompt_logits(ids).log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1)
    assert kl.mean() < max_mean_kl
    chosen = exact.gather(-1, approx.argmax(-1, keepdim=True))[:, 0]
    assert (exact.max(-1).values - chosen).max() < MAX_CHOICE_GAP


def test_int4_paths_answer(smollm2_int4):
    output = smollm2_int4.generate([chat_ids(smollm2_int4, "Which city is the capital of Germany?")],
                                   SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Berlin" in output.text


def write_checkpoint(tmp_path, config, seed: int, **save_kwargs):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for parameter in model.parameters():  # sharper than the default init, so greedy paths are well separated
        parameter.data.normal_(0, 0.5 if parameter.dim() > 1 else 0.2)
    model.save_pretrained(tmp_path, **save_kwargs)
    return model


CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(  # head_dim apart from hidden / heads, as Qwen3's own configs have it
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=1000000.0,
        tie_word_embeddings=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(  # experts in layers 0 and 2, a dense MLP in layer 1
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=512,
        rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3_moe_sparse_step": lambda: transformers.Qwen3MoeConfig(  # experts every second layer, not renormalized
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False, decoder_sparse_step=2, max_position_embeddings=512, rope_theta=1000000.0,
        tie_word_embeddings=True),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("sharded", [False, True])
def test_tiny_random_checkpoint_matches_transformers(tmp_path, arch, sharded):
    reference = write_checkpoint(tmp_path, CONFIGS[arch](), seed=3,
                                 **({"max_shard_size": "100KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    llm = LLM(str(tmp_path), dtype="float32", device="cpu")
    assert llm.tokenizer is None
    assert_matches(llm, reference)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen3_moe_sparse_step"])
def test_the_same_checkpoint_as_gguf_matches_transformers(tmp_path, arch):
    reference = write_checkpoint(tmp_path / "hf", CONFIGS[arch](), seed=5)
    llm = LLM(str(write_gguf(reference, tmp_path / "model.gguf")), dtype="float32", device="cpu")
    assert llm.engine.model_config.arch == reference.config.model_type
    assert llm.tokenizer.chat_template == builtin_template("qwen3")  # the file brought none
    assert_matches(llm, reference)


def assert_matches(llm: LLM, reference) -> None:
    """Logits of a 40-token prompt at every position, and greedy tokens alone and batched with shorter ones."""
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0]
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                      pad_token_id=0)[0, 40:].tolist()
    torch.testing.assert_close(llm.engine.prompt_logits(prompt), theirs, atol=ATOL, rtol=0)
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids == \
        expected
    shorter = [prompt[:23], prompt[:7]]
    with torch.inference_mode():
        alone = [reference.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):]
                 .tolist() for p in shorter]
    together = llm.generate([prompt, *shorter], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in together] == [expected, *alone]


def forced_decode_logprobs(llm: LLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-probabilities of each decode step of ``prompt`` followed by ``tokens`` (teacher-forced, so two engines
    see the same inputs): the prefill's last position, then one decode step per token."""
    engine = llm.engine
    engine.add_request("forced", prompt, SamplingParams(temperature=0, max_tokens=len(tokens) + 1, ignore_eos=True))
    rows = []
    for token in tokens:
        batch = engine.scheduler.schedule()
        rows.append(engine.runner.run(batch)[0].log_softmax(-1))
        batch[0].num_computed = len(batch[0])
        batch[0].output_ids.append(token)
    engine.abort("forced")
    return torch.stack(rows)


def cache_kl(reference: LLM, quantized: LLM, question: str) -> float:
    """Mean KL from ``reference`` to ``quantized`` over 48 teacher-forced decode steps of the reference's answer."""
    ids = chat_ids(reference, question)
    tokens = reference.generate([ids], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0].token_ids
    exact = forced_decode_logprobs(reference, ids, tokens)
    approx = forced_decode_logprobs(quantized, ids, tokens)
    return (exact.exp() * (exact - approx)).sum(-1).mean().item()


# mean KL over 48 teacher-forced decode steps to the fp32 cache: twice the larger of the two questions' (measured
# int8 0.00068-0.00085, fp8 0.0025-0.0057: e4m3 keeps 3 mantissa bits where int8 keeps about 7 near a row's peak)
CACHE_KL = {"int8": 0.0017, "fp8": 0.0113}


@pytest.mark.parametrize("kv_cache_dtype", list(CACHE_KL))
@pytest.mark.parametrize("question", ["Write a haiku about rain.", "Name three primary colors."])
def test_an_8bit_kv_cache_stays_within_its_measured_kl_of_the_fp32_cache(smollm2_gguf, smollm2_fp32, question,
                                                                         kv_cache_dtype):
    """On the exact fp32 path, where nothing but the cache differs (``CACHE_KL``)."""
    from engine import EngineConfig

    quantized = LLM(str(smollm2_gguf), dtype="float32", device="cpu",
                    config=EngineConfig(kv_cache_dtype=kv_cache_dtype))
    assert cache_kl(smollm2_fp32, quantized, question) <= CACHE_KL[kv_cache_dtype]


# mean KL of a 4-bit path with an int8 cache to the same path with the model-dtype cache, at most twice the largest
# measured: torch's path (it dequantizes the cache) 0.0014-0.0021; the native ones 0.0051-0.0136, as they quantize
# activations per block, so the cache's small changes flip roundings downstream (they are 0.020-0.023 from fp32 by
# themselves; the prefill position, where no native attention runs, moves as much as the decode steps)
INT8_CACHE_KL = {"torch": 0.0042, "avx512": 0.02, "avx2": 0.02}


@pytest.mark.parametrize("question", ["Which city is the capital of Germany?", "Write a haiku about rain."])
def test_an_int8_kv_cache_follows_the_model_dtype_cache(smollm2_gguf, smollm2_int4, question):
    """Each 4-bit path with keys and values in int8 (the native decode kernel reads them, torch's path dequantizes
    them): within ``INT8_CACHE_KL`` of the same path with the model-dtype cache, and the same answer."""
    from engine import EngineConfig

    dtype, isa = smollm2_int4.kernel
    quantized = LLM(str(smollm2_gguf), dtype=dtype, device="cpu", cpu_isa=isa,
                    config=EngineConfig(kv_cache_dtype="int8"))
    assert quantized.engine.runner.kv_cache.data.dtype == torch.int8
    assert cache_kl(smollm2_int4, quantized, question) <= INT8_CACHE_KL[isa]
    if "Germany" in question:
        answer = quantized.generate([chat_ids(quantized, question)], SamplingParams(temperature=0, max_tokens=24))
        assert "Berlin" in answer[0].text


def test_an_fp8_cache_on_the_native_path_reads_through_torch_and_answers(smollm2_gguf, smollm2_int4):
    """The native decode kernel reads int8 or 16-bit rows only: with an fp8 cache the fast paths' decode attention
    runs on torch over the dequantized rows, and the answer holds."""
    from engine import EngineConfig

    dtype, isa = smollm2_int4.kernel
    fp8 = LLM(str(smollm2_gguf), dtype=dtype, device="cpu", cpu_isa=isa, config=EngineConfig(kv_cache_dtype="fp8"))
    assert fp8.engine.runner.kv_cache.data.dtype == torch.float8_e4m3fn
    question = chat_ids(fp8, "Which city is the capital of Germany?")
    assert "Berlin" in fp8.generate([question], SamplingParams(temperature=0, max_tokens=24))[0].text
