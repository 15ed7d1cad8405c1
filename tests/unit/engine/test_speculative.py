"""Speculative decoding with a hybrid model's multi-token-prediction block (``speculative_tokens``) on tiny random
checkpoints (Qwen3.5, Qwen3-Next with experts, Qwen3.5's multimodal layout): the block's drafts against
transformers' own decoder layer and norms fed as the published block is; greedy tokens identical with and without
drafts (alone, batched, after a preemption, on the torch and the native paths); drafts verified in rounds that keep
exactly the model's own tokens when most drafts are right (a drafter that knows the answer, wrong every third
token), the states rolled back to the last accepted token; a seeded sampling request and a grammar-constrained one
unchanged; the GGUF file's block equal to the folder's; the counters."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers

from engine import LLM, EngineConfig, SamplingParams
from engine.config import ModelConfig
from engine.grammar import GrammarCompiler, json_schema_grammar
from engine.kernels import native
from engine.kv_store import kv_bytes_per_token
from engine.runner import DraftRows
from engine.scheduler import SchedulerConfig
from tests.llama_converter import convert
from tests.unit.engine.test_hybrid_models import (
    ATOL,
    VOCAB,
    add_mtp_weights,
    build_config,
    random_prompt,
    write_checkpoint,
)

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
ARCHS = ["qwen3_5_text", "qwen3_next", "qwen3_5"]
NATIVE = [isa for isa in native.ISAS if native.runs_here(isa)][:1]  # the fastest build this CPU runs


@pytest.fixture(scope="module", params=ARCHS)
def drafting(request, tmp_path_factory):
    """A checkpoint with its block: (folder, transformers' model, the block's weights)."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(folder, build_config(request.param))
    return folder, reference, add_mtp_weights(folder)


def speculative(folder, tokens: int, *, isa: str = "auto", budget: int = 2048, seats: int = 8, **engine) -> LLM:
    """fp32, drafting ``tokens`` a step (``engine``: more ``EngineConfig`` fields)."""
    scheduler = SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget)
    return LLM(str(folder), dtype="float32", device="cpu", cpu_isa=isa,
               config=EngineConfig(speculative_tokens=tokens, scheduler=scheduler, **engine))


def tokens_of(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, params)]


def reference_block(reference: transformers.PreTrainedModel, weights: dict[str, torch.Tensor]):
    """The block as published (vLLM's and llama.cpp's reading of it) on transformers' modules: rows of (next token,
    hidden state) -> its normed output and logits at every row, causal attention over its own rows."""
    text = reference.model.language_model if hasattr(reference.model, "language_model") else reference.model
    layer = copy.deepcopy(text.layers[3])  # a full-attention layer of the model's own kind
    state = {name.removeprefix("mtp.layers.0."): tensor for name, tensor in weights.items()
             if name.startswith("mtp.layers.0.")}
    experts = sorted({int(name.split(".")[2]) for name in state if name.startswith("mlp.experts.")})
    if experts:  # transformers holds an MoE layer's experts stacked, gate and up joined (checkpoints: one by one)
        part = {p: [state.pop(f"mlp.experts.{e}.{p}_proj.weight") for e in experts] for p in ("gate", "up", "down")}
        joined = [torch.cat(pair) for pair in zip(part["gate"], part["up"], strict=True)]
        state["mlp.experts.gate_up_proj"] = torch.stack(joined)
        state["mlp.experts.down_proj"] = torch.stack(part["down"])
    layer.load_state_dict(state)
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = copy.deepcopy(text.norm)
        norms[name].weight.data = weights[f"mtp.{name}.weight"].clone()

    @torch.inference_mode()
    def block(tokens: list[int], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(tokens)
        joined = torch.cat((norms["pre_fc_norm_embedding"](text.embed_tokens(torch.tensor(tokens))),
                            norms["pre_fc_norm_hidden"](hidden)), -1)
        x = (joined @ weights["mtp.fc.weight"].T)[None]
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        x = layer(x, position_embeddings=text.rotary_emb(x, positions), attention_mask=mask, position_ids=positions)
        normed = norms["norm"](x[0])
        return normed, reference.lm_head(normed)

    return text, block


def recorded_drafts(llm: LLM) -> list[tuple[list[DraftRows], bool, torch.Tensor]]:
    """Every call of the block from now on: its rows, whether from the model's hidden states, its logits."""
    calls, draft = [], llm.engine.runner.draft

    def recording(rows, hidden, from_model):
        normed, logits = draft(rows, hidden, from_model)
        calls.append((rows, from_model, logits.clone()))
        return normed, logits

    llm.engine.runner.draft = recording
    return calls


def test_the_block_drafts_as_the_published_one(drafting):
    """A 100-token prompt in chunks of 40, then decode steps drafting two tokens: each call's logits (the block at
    each row's last position, and the second draft from the block's own output) equal the reference block's over
    the same tokens and transformers' hidden states (fp32, 1e-4)."""
    folder, reference, weights = drafting
    llm = speculative(folder, 2, budget=40, seats=4)
    calls = recorded_drafts(llm)
    prompt = random_prompt(100)
    full = prompt + tokens_of(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    text, block = reference_block(reference, weights)
    with torch.inference_mode():
        hidden = text(torch.tensor([full])).last_hidden_state[0]
    normed, logits = block(full[1:], hidden[:-1])
    chained = 0
    for rows, from_model, got in calls:
        for row, row_logits in zip(rows, got, strict=True):
            q = row.step_end - 1
            if from_model:
                assert row.tokens[-1] == full[q + 1]
                torch.testing.assert_close(row_logits, logits[q], atol=ATOL, rtol=0)
            else:  # the block again at q, from its own output at q - 1 and the token it drafted there
                _, again = block([*full[1 : q + 1], row.tokens[0]], torch.cat((hidden[:q], normed[q - 1 : q])))
                torch.testing.assert_close(row_logits, again[q], atol=ATOL, rtol=0)
                chained += 1
    assert sum(from_model for _, from_model, _ in calls) >= 3 + 1 and chained >= 1  # 3 chunks, then decode steps


@pytest.mark.parametrize("isa", ["torch", *NATIVE])
def test_greedy_tokens_are_the_same_with_and_without_drafts(drafting, isa):
    """The block's own drafts (random weights: nearly all refused) over a batch of mixed lengths, drafting 1 and 3
    tokens: the tokens of the model without them, on torch's path and the native one (fp32)."""
    folder, _, _ = drafting
    prompts = [random_prompt(40), random_prompt(7, seed=2), random_prompt(90, seed=3)]
    plain = LLM(str(folder), dtype="float32", device="cpu", cpu_isa=isa)
    expected = tokens_of(plain, prompts)
    for drafted in (1, 3):
        llm = speculative(folder, drafted, isa=isa)
        assert tokens_of(llm, prompts) == expected
        stats = llm.engine.stats()
        assert stats.spec_drafts > 0 and stats.spec_draft_tokens >= stats.spec_drafts


def oracle(llm, continuations: list[list[int]], vocab: int = VOCAB) -> None:
    """Make ``llm``'s drafter (an ``LLM``'s or ``AsyncEngine``'s engine's) propose each sequence's true next tokens
    (``continuations``: prompt and expected output), wrong at every position divisible by 3, as logits over
    ``vocab``; the block itself is not run."""
    owners: dict[int, list[int]] = {}

    def draft(rows, hidden, from_model):
        picks = []
        for row in rows:
            known = owners.get(row.block_table[0])
            if known is None:  # a prompt's first rows (after any cached prefix): find its continuation
                known = owners[row.block_table[0]] = next(
                    c for c in continuations if c[row.num_computed + 1 : row.step_end] == row.tokens[:-1])
            position = row.step_end - 1
            token = known[position + 2] if position + 2 < len(known) else 0
            picks.append(token if position % 3 else (token + 1) % vocab)
        logits = torch.full((len(rows), vocab), -1e9)
        logits[torch.arange(len(rows)), torch.tensor(picks)] = 0.0
        return torch.zeros(len(rows), hidden.shape[-1]), logits

    llm.engine.runner.draft = draft


def count_steps(llm: LLM) -> list[int]:
    """A list that grows by one at each of ``llm``'s engine steps from now on."""
    steps, step = [], llm.engine.step

    def counted():
        steps.append(len(steps))
        return step()

    llm.engine.step = counted
    return steps


@pytest.mark.parametrize("isa", ["torch", *NATIVE])
def test_verified_drafts_keep_the_model_s_own_tokens(drafting, isa):
    """Drafts that are right two times in three, 1 and 3 a step: the same tokens as without them, most drafts
    accepted and the rest refused (so the states were rolled back to the last accepted token and the next step
    computed from there), in fewer steps than tokens."""
    folder, _, _ = drafting
    prompts = [random_prompt(40), random_prompt(7, seed=2), random_prompt(90, seed=3)]
    expected = tokens_of(LLM(str(folder), dtype="float32", device="cpu", cpu_isa=isa), prompts)
    for drafted in (1, 3):
        llm = speculative(folder, drafted, isa=isa)
        oracle(llm, [p + e for p, e in zip(prompts, expected, strict=True)])
        steps = count_steps(llm)
        assert tokens_of(llm, prompts) == expected
        stats = llm.engine.stats()
        assert 0.4 * stats.spec_draft_tokens < stats.spec_accepted_tokens < stats.spec_draft_tokens
        assert len(steps) - 1 < 0.75 * GREEDY.max_tokens  # one prefill step, then more than one token a step


def test_a_preempted_sequence_drafts_again_after_its_recompute(drafting):
    """Four requests in a cache that holds two at full length: preemptions (their drafts and blocks dropped, the
    prompt and output recomputed with the block's keys) and the same tokens as without drafts."""
    folder, _, _ = drafting
    prompts = [random_prompt(100, seed=s) for s in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = tokens_of(LLM(str(folder), dtype="float32", device="cpu"), prompts, params)
    config = dataclasses.replace(ModelConfig.from_hf(json.loads((folder / "config.json").read_text())), mtp_layers=1)
    blocks = 16  # two requests of 7 blocks that grow to 9 each
    llm = speculative(folder, 2, kv_cache_memory=blocks * 16 * kv_bytes_per_token(config, torch.float32, "auto"),
                      max_model_len=160, state_snapshots=0)
    engine = llm.engine
    oracle(llm, [p + e for p, e in zip(prompts, expected, strict=True)])
    assert tokens_of(llm, prompts, params) == expected
    assert engine.stats().preemptions > 0 and engine.stats().spec_accepted_tokens > 0


def test_a_seeded_sampling_request_samples_the_same_tokens(drafting):
    """Sampling at temperature 0.8 with a seed: each round samples as one step would (the same random stream, the
    same penalties), so drafts that stand change nothing."""
    folder, _, _ = drafting
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=24, presence_penalty=0.5,
                            ignore_eos=True)
    prompt = random_prompt(30)
    expected = tokens_of(LLM(str(folder), dtype="float32", device="cpu"), [prompt], params)
    llm = speculative(folder, 2)
    oracle(llm, [prompt + expected[0]])
    assert tokens_of(llm, [prompt], params) == expected
    assert llm.engine.stats().spec_accepted_tokens > 0


def test_the_gguf_file_s_block_equals_the_folder_s(smollm2_tokenizer_files, tmp_path):
    """llama.cpp's converter writes the block as one more layer (``nextn``): its drafts' logits equal the folder's."""
    folder = tmp_path / "hf"
    write_checkpoint(folder, build_config("qwen3_5_text", vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    add_mtp_weights(folder)
    gguf = convert(folder, tmp_path / "with.gguf")
    prompt = [token * 151 % 49152 for token in random_prompt(60)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = []
    for path in (folder, gguf):
        llm = speculative(path, 2)
        calls = recorded_drafts(llm)
        runs.append((tokens_of(llm, [prompt], params), [logits for _, _, logits in calls]))
    (folder_tokens, folder_logits), (file_tokens, file_logits) = runs
    assert file_tokens == folder_tokens and len(file_logits) == len(folder_logits) > 4
    for theirs, ours in zip(file_logits, folder_logits, strict=True):
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_drafting_needs_the_block_and_room_for_the_drafts(hybrid_without_block):
    """A checkpoint without the block is refused with a reason; so is a token budget that cannot hold every seat's
    drafts."""
    with pytest.raises(ValueError, match="multi-token-prediction"):
        speculative(hybrid_without_block, 2)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(speculative_tokens=3, scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32))


@pytest.fixture
def hybrid_without_block(tmp_path):
    write_checkpoint(tmp_path, build_config("qwen3_5_text"))
    return tmp_path


def test_a_grammar_sees_only_the_tokens_that_stand(smollm2_tokenizer_files, tmp_path):
    """A JSON-schema grammar with drafts right two times in three: each round's mask is the grammar's after the
    rounds before (a refused draft never reaches the matcher), so the tokens are those without drafts."""
    folder = tmp_path / "hf"
    write_checkpoint(folder, build_config("qwen3_5_text", vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    add_mtp_weights(folder)
    plain = LLM(str(folder), dtype="float32", device="cpu")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    grammar = GrammarCompiler(plain.tokenizer, plain.engine.info.logits_width).compile(
        json_schema_grammar(json.dumps(schema)))
    params = SamplingParams(temperature=0, max_tokens=24, grammar=grammar)
    prompt = [token * 151 % 49152 for token in random_prompt(40)]
    expected = tokens_of(plain, [prompt], params)
    assert plain.tokenizer.decode(expected[0]).startswith("{")
    llm = speculative(folder, 2)
    oracle(llm, [prompt + expected[0]], vocab=49152)
    assert tokens_of(llm, [prompt], params) == expected
    stats = llm.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
