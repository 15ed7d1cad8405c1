"""Hybrid Qwen models (Qwen3-Next, Qwen3.5, Qwen3.5-MoE: Gated DeltaNet layers beside gated full attention) against
transformers on tiny random checkpoints: logits at every position of a 300-token prompt (several chunks of the
chunked form), greedy tokens alone, in a batch of mixed lengths, over chunked prefill and after a preemption."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from gguf import GGUFReader

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.kernels import native
from engine.linear_attention import CHUNK, GatedDeltaNet, chunked_delta_rule, l2norm, recurrent_update
from engine.pooling import PoolingTask
from engine.scheduler import SchedulerConfig
from engine.weights.loader import load_model
from tests.llama_converter import convert
from tests.unit.engine.conftest import RecordingSampler
from tokenizer.gguf_metadata import gguf_metadata

ATOL = 1e-4  # fp32 logits, absolute (rtol 0)
VOCAB = 320
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_conv_kernel_dim=4)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False, **LINEAR)
EXPERTS = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)

CONFIGS = {  # layer_types: three linear layers, then full attention (the published pattern), partial rotary 0.25
    "qwen3_next": lambda: transformers.Qwen3NextConfig(intermediate_size=96, **EXPERTS, **COMMON),
    "qwen3_5_text": lambda: transformers.Qwen3_5TextConfig(intermediate_size=96, **COMMON),
    "qwen3_5_moe_text": lambda: transformers.Qwen3_5MoeTextConfig(**EXPERTS, **COMMON),
    "qwen3_5": lambda: transformers.Qwen3_5Config(  # the published multimodal layout: text_config, a vision tower
        text_config={**COMMON, "intermediate_size": 96},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64}),
}


def build_config(arch: str, vocab_size: int = VOCAB) -> transformers.PretrainedConfig:
    config = CONFIGS[arch]()
    (config.text_config if isinstance(config, transformers.Qwen3_5Config) else config).vocab_size = vocab_size
    return config


def write_checkpoint(folder, config) -> transformers.PreTrainedModel:
    """Random weights (std 0.15: at 0.5 transformers' own fp32 logits drift 2e-4 from its fp64 ones over 300
    tokens, so no fp32 implementation could be held to 1e-4) saved as transformers saves them."""
    torch.manual_seed(3)
    if isinstance(config, transformers.Qwen3_5Config):
        model = transformers.Qwen3_5ForConditionalGeneration(config).float().eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.15 if parameter.dim() > 1 else 0.2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def hybrid(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(folder, build_config(request.param))
    return folder, reference


def random_prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_reference(reference, prompt: list[int], tokens: int = 16) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():  # the mask given: generate would take the prompt's zeros for padding (pad id 0)
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_logits_match_transformers_at_every_position(hybrid):
    folder, reference = hybrid
    llm = LLM(str(folder), dtype="float32", device="cpu")
    assert llm.engine.model_config.hybrid
    prompt = random_prompt(300)
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(llm.engine.prompt_logits(prompt), theirs, atol=ATOL, rtol=0)


def test_greedy_tokens_alone_and_in_a_batch_of_mixed_lengths(hybrid):
    folder, reference = hybrid
    llm = LLM(str(folder), dtype="float32", device="cpu")
    prompts = [random_prompt(90), random_prompt(23, seed=2), random_prompt(7, seed=3)]
    expected = [greedy_reference(reference, p) for p in prompts]
    assert llm.generate([prompts[0]], GREEDY)[0].token_ids == expected[0]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected


@pytest.mark.parametrize("isa", [isa for isa in native.ISAS if native.runs_here(isa)])
def test_the_native_recurrent_kernel_gives_the_reference_tokens(isa, tmp_path):
    """fp32 on a native build: decode rows advance their states in ``recurrent.cpp`` and the attention layers'
    decode rows (64-dim heads, half of each rotated, per-head norms) run on the native decode-attention kernel (the
    layers stay dense fp32), and give transformers' greedy tokens, alone and batched."""
    config = build_config("qwen3_5_text")
    config.head_dim = 64
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5}
    reference = write_checkpoint(tmp_path, config)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_isa=isa)
    layers = [layer.attn for layer in llm.engine.runner.model.layers]
    assert all(layer.decode_kernel is not None for layer in layers if isinstance(layer, GatedDeltaNet))
    assert all(layer.decode_attention is not None for layer in layers if not isinstance(layer, GatedDeltaNet))
    assert llm.engine.model_config.rotated_dim == 32
    prompts = [random_prompt(90), random_prompt(23, seed=2)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [greedy_reference(reference, p) for p in prompts]


def engine_for(folder, *, budget: int = 2048, seats: int = 8, kv_bytes: int = 16 << 20,
               max_model_len: int = 1024, snapshots: int = 8) -> LLMEngine:
    loaded = load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    scheduler = SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget)
    return LLMEngine(loaded, EngineConfig(kv_cache_memory=kv_bytes, max_model_len=max_model_len,
                                          scheduler=scheduler, state_snapshots=snapshots))


def run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


def test_chunked_prefill_beside_decodes_gives_the_same_tokens(hybrid):
    """A 300-token prompt computed 40 tokens a step (its chunks start mid-chunk of the chunked form) while two
    short requests decode in the same steps."""
    folder, reference = hybrid
    prompts = [random_prompt(9, seed=4), random_prompt(300), random_prompt(13, seed=5)]
    engine = engine_for(folder, budget=40)
    assert run(engine, prompts) == [greedy_reference(reference, p) for p in prompts]


def test_a_preempted_sequence_recomputes_its_state(hybrid):
    """Two blocks' worth of cache too few for both sequences: the newest is preempted (its state slot freed, its
    state recomputed from zero when it runs again), and both still give transformers' tokens."""
    folder, reference = hybrid
    prompts = [random_prompt(60, seed=6), random_prompt(60, seed=7)]
    per_block = 16 * 2 * 2 * 32 * 4  # 16 tokens of one attention layer's keys and values: 2 heads of 32, fp32
    engine = engine_for(folder, seats=2, kv_bytes=per_block * 9, max_model_len=128,  # 144 tokens < 2 x (60 + 16)
                        snapshots=0)
    assert run(engine, prompts) == [greedy_reference(reference, p) for p in prompts]
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def run_recorded(engine: LLMEngine, request_id: str, prompt: list[int]) -> tuple[list[int], torch.Tensor, int]:
    """One request alone: its tokens, the logits of its sampled steps, and its cached prompt tokens."""
    engine.sampler = recorder = RecordingSampler()
    engine.add_request(request_id, prompt, GREEDY)
    tokens, cached = [], -1
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    return tokens, torch.cat(recorder.steps), cached


def test_a_shared_prefix_resumes_from_its_state_snapshot(hybrid):
    """A 1,100-token prompt keeps its state at its last full block (1,088 tokens); a second request that extends
    it resumes there (only its last 52 tokens are computed) and gives a cold engine's logits and tokens."""
    folder, reference = hybrid
    first = random_prompt(1100, seed=8)
    second = first + random_prompt(40, seed=9)
    engine = engine_for(folder, max_model_len=1200)
    run_recorded(engine, "first", first)
    computed = []
    engine.runner.run = lambda batch, run=engine.runner.run: computed.append(  # tokens each step computes
        sum(s.step_end - s.num_computed for s in batch)) or run(batch)
    tokens, logits, cached = run_recorded(engine, "second", second)
    assert cached == 1088 and computed[0] == len(second) - 1088
    cold_tokens, cold_logits, cold_cached = run_recorded(engine_for(folder, max_model_len=1200), "cold", second)
    assert cold_cached == 0
    torch.testing.assert_close(logits, cold_logits, atol=ATOL, rtol=0)
    assert tokens == cold_tokens == greedy_reference(reference, second)


def test_a_prefix_without_a_snapshot_is_recomputed(hybrid):
    """With no snapshot slots, KV blocks alone never resume a hybrid model's prefix: nothing is reported cached and
    the tokens are still right."""
    folder, reference = hybrid
    prompt = random_prompt(100, seed=10)
    engine = engine_for(folder, snapshots=0)
    run_recorded(engine, "first", prompt)
    tokens, _, cached = run_recorded(engine, "again", [*prompt, 5, 6, 7])
    assert cached == 0 and tokens == greedy_reference(reference, [*prompt, 5, 6, 7])


class FailingLater:
    """A grammar that allows every token until its matcher's ``calls``-th mask, which raises: a fault in one row's
    sampling during a decode step (a prefill step's rows start from zeros, so running one again changes nothing)."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def matcher(self, stop_ids):
        grammar = self

        class Matcher:
            asked = 0

            def fill_next_token_bitmask(self, bitmask, index):
                self.asked += 1
                if self.asked >= grammar.calls:
                    raise RuntimeError("matcher fault")
                bitmask[index] = -1

            def accept_token(self, token_id):
                return True

        return Matcher()


def test_a_row_that_fails_in_sampling_ends_alone_without_advancing_the_others_twice(hybrid):
    """A failed batch is sampled again row by row from the step's kept logits: running the forward pass again, as
    for other models, would advance every row's state a second time."""
    folder, reference = hybrid
    engine = engine_for(folder)
    prompts = [random_prompt(30, seed=11), random_prompt(12, seed=12)]
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("bad", random_prompt(9, seed=13),
                       SamplingParams(temperature=0, max_tokens=16, grammar=FailingLater(4)))
    engine.add_request("c", prompts[1], GREEDY)
    tokens: dict[str, list[int]] = {"a": [], "bad": [], "c": []}
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons == {"a": "length", "bad": "error", "c": "length"} and len(tokens["bad"]) == 3  # then it broke
    assert [tokens["a"], tokens["c"]] == [greedy_reference(reference, p) for p in prompts]


def test_the_chunked_form_equals_the_recurrent_form():
    """fp64, from a non-zero state, over a length that is not a multiple of the chunk: the chunked form's output and
    final state are the token-by-token recurrence's."""
    generator = torch.Generator().manual_seed(0)
    tokens, heads, key_dim, value_dim = 2 * CHUNK + 17, 3, 8, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = l2norm(rand(tokens, heads, key_dim)), l2norm(rand(tokens, heads, key_dim)), rand(tokens, heads, value_dim)
    decay, beta = -rand(tokens, heads).abs() * 0.1, rand(tokens, heads).sigmoid()
    start = rand(heads, key_dim, value_dim)
    chunked_state = start.clone()
    chunked = chunked_delta_rule(chunked_state, q, k, v, decay, beta)
    state = start.clone()[None]
    recurrent = torch.stack([recurrent_update(state, q[t : t + 1], k[t : t + 1], v[t : t + 1], decay[t : t + 1],
                                              beta[t : t + 1])[0] for t in range(tokens)])
    torch.testing.assert_close(chunked, recurrent, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked_state, state[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_llama_cpp_conversion_of_the_checkpoint_gives_the_same_model(arch, smollm2_tokenizer_files, tmp_path):
    """The checkpoint (with SmolLM2's 49,152-token vocabulary) converted by llama.cpp's own convert_hf_to_gguf.py:
    norms stored as 1 + weight, the decay as -exp(A_log), Qwen3-Next's grouped projections split, Qwen3.5's value
    heads reordered tiled. The GGUF file gives the folder's logits and greedy tokens."""
    folder = tmp_path / "hf"
    write_checkpoint(folder, build_config(arch, vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    gguf = convert(folder, tmp_path / "model.gguf", "--no-mtp")
    from_folder, from_gguf = (LLM(str(path), dtype="float32", device="cpu") for path in (folder, gguf))
    assert from_gguf.engine.model_config.arch == from_folder.engine.model_config.arch
    prompt = [token * 151 % 49152 for token in random_prompt(300)]
    torch.testing.assert_close(from_gguf.engine.prompt_logits(prompt), from_folder.engine.prompt_logits(prompt),
                               atol=ATOL, rtol=0)
    prompts = [prompt[:90], prompt[:23]]
    assert [o.token_ids for o in from_gguf.generate(prompts, GREEDY)] == \
        [o.token_ids for o in from_folder.generate(prompts, GREEDY)]


def add_mtp_weights(folder, seed: int = 5) -> dict[str, torch.Tensor]:
    """A multi-token-prediction block as Qwen3-Next and Qwen3.5 checkpoints ship it (``mtp.*``: one decoder layer
    shaped as the last, full-attention one, the fc that joins the normed embedding and hidden state, and three
    norms), of random weights; returns them."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    last = "model.language_model.layers.3." if "text_config" in config else "model.layers.3."
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    mtp = {f"mtp.layers.0.{name.removeprefix(last)}": rand(*tensor.shape, std=0.15 if tensor.dim() > 1 else 0.2)
           for name, tensor in weights.items() if name.startswith(last)}
    hidden = text["hidden_size"]
    mtp |= {"mtp.fc.weight": rand(hidden, 2 * hidden), **{f"mtp.{norm}.weight": rand(hidden, std=0.2)
            for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}}
    save_file(weights | mtp, folder / "model.safetensors", metadata={"format": "pt"})
    text["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return mtp


def test_a_gguf_file_with_its_mtp_block_serves_the_model_without_it(smollm2_tokenizer_files, tmp_path):
    """llama.cpp writes the MTP block as one more layer (``nextn_predict_layers``): it is left unread, and the file
    gives the same logits as the one converted without it."""
    folder = tmp_path / "hf"
    write_checkpoint(folder, build_config("qwen3_5_text", vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    without = convert(folder, tmp_path / "without.gguf", "--no-mtp")
    add_mtp_weights(folder)
    with_mtp = convert(folder, tmp_path / "with.gguf")
    prompt = [token * 151 % 49152 for token in random_prompt(90)]
    plain, extended = (LLM(str(path), dtype="float32", device="cpu") for path in (without, with_mtp))
    metadata = gguf_metadata(GGUFReader(with_mtp))
    assert (metadata["qwen35.block_count"], metadata["qwen35.nextn_predict_layers"]) == (5, 1)
    assert extended.engine.model_config.num_layers == 4
    torch.testing.assert_close(extended.engine.prompt_logits(prompt), plain.engine.prompt_logits(prompt), atol=0,
                               rtol=0)


def test_pooling_prompts_keep_their_states_beside_a_decoding_request(hybrid):
    """Mean-pooled embeddings of prompts computed 40 tokens a step on 3 seats (each in its own state slot) while a
    request decodes: transformers' final hidden states, and the decoding request's own tokens."""
    folder, reference = hybrid
    engine = engine_for(folder, budget=40, seats=3)
    prompts = [random_prompt(90, seed=8), random_prompt(23, seed=9), random_prompt(7, seed=10), random_prompt(50)]
    engine.add_request("chat", random_prompt(9, seed=4), GREEDY)
    engine.add_pooling("embed", prompts, PoolingTask.embed("mean"))
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    decoder = reference.get_decoder()
    with torch.inference_mode():
        theirs = torch.stack([F.normalize(decoder(torch.tensor([p])).last_hidden_state[0].mean(0), dim=-1)
                              for p in prompts])
    torch.testing.assert_close(outputs["embed"][0].pooled, theirs, atol=1e-5, rtol=0)
    assert [t for out in outputs["chat"] for t in out.new_token_ids] == greedy_reference(reference,
                                                                                        random_prompt(9, seed=4))
