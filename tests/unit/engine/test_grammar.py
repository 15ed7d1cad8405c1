"""Grammar-constrained decoding: the sampler's mask against xgrammar's own, schema-valid output from the real
SmolLM2 inside a mixed batch, and unconstrained rows that stay exactly as they were."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import xgrammar as xgr

from engine import LLMEngine, SamplingParams
from engine.grammar import GrammarCompiler, GrammarError, json_schema_grammar, literal_grammar
from engine.sampling import Sampler, SampleRequest, mask_logits
from tests.unit.engine.test_async_engine import engine_over, prompt, run_solo, smollm2  # noqa: F401

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"}},
         "required": ["ok", "score"]}


@pytest.fixture(scope="module")
def compiler(smollm2) -> GrammarCompiler:  # noqa: F811
    return GrammarCompiler(smollm2.tokenizer, smollm2.config.vocab_size)


def test_mask_equals_xgrammars_own(compiler, smollm2):  # noqa: F811
    grammar = compiler.compile(json_schema_grammar(json.dumps(PERSON)))
    width = smollm2.config.vocab_size
    matcher = grammar.matcher([2])
    assert matcher.accept_string('{"name": "Bo')
    logits = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    free = SampleRequest(SamplingParams(temperature=0), [], [], frozenset(), None)
    bound = SampleRequest(SamplingParams(temperature=0), [], [], frozenset(), None, matcher)
    masked = logits.clone()
    mask_logits(masked, [free, bound])
    reference = logits[1:].clone()
    bitmask = xgr.allocate_token_bitmask(1, width)
    matcher.fill_next_token_bitmask(bitmask)
    xgr.apply_token_bitmask_inplace(reference, bitmask)
    assert torch.equal(masked[0], logits[0])
    assert torch.equal(masked[1].isinf(), reference[0].isinf())
    allowed = (~masked[1].isinf()).sum().item()
    assert 0 < allowed < width


def test_sampler_only_picks_allowed_tokens(compiler, smollm2):  # noqa: F811
    grammar = compiler.compile(literal_grammar('say "hi"\n'))
    matcher = grammar.matcher([2])
    text = b""
    sampler = Sampler(smollm2.tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(1, smollm2.config.vocab_size, generator=generator)
        row = SampleRequest(SamplingParams(temperature=1.0, seed=1), [], [], frozenset({2}), generator, matcher)
        token = sampler(logits, [row]).token_ids[0]
        if token == 2:
            break
        assert matcher.accept_token(token)
        text += smollm2.tokenizer.token_bytes(token)
    assert text == b'say "hi"\n'


def generate(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str]]:
    for index, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{index}", ids, p)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [(tokens[f"r{i}"], reasons[f"r{i}"]) for i in range(len(prompts))]


def test_schema_outputs_validate_in_a_mixed_batch(compiler, smollm2):  # noqa: F811
    schemas = [PERSON, COLOR, FLAGS]
    questions = ["Describe a person called Ann as JSON.", "Pick a color for the sky as JSON.",
                 "Rate this answer as JSON: is it ok and what score?"]
    grammars = [compiler.compile(json_schema_grammar(json.dumps(s))) for s in schemas]
    free_prompt = prompt(smollm2, "Write one sentence about rain.")
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = engine_over(smollm2)
    expected_free = run_solo(engine, free_prompt, free)
    prompts = [prompt(smollm2, q) for q in questions] + [free_prompt]
    params = [SamplingParams(temperature=0, max_tokens=60, grammar=g, stop_token_ids=(2,)) for g in grammars]
    results = generate(engine, prompts, [*params, free])
    for schema, (tokens, reason) in zip(schemas, results, strict=False):
        assert reason == "stop"
        jsonschema.validate(json.loads(smollm2.tokenizer.decode(tokens)), schema)
    assert results[-1][0] == expected_free
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_grammar_state_survives_preemption(compiler, smollm2):  # noqa: F811
    grammar = compiler.compile(json_schema_grammar(json.dumps(PERSON)))
    names = ["Ann", "Bob", "Cy", "Di", "Ed", "Flo"]
    prompts = [prompt(smollm2, f"Describe a person called {name} as JSON.") for name in names]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=40, grammar=grammar, stop_token_ids=(2,))
              for i in range(len(prompts))]
    roomy = generate(engine_over(smollm2, max_model_len=128), prompts, params)
    per_token = 30 * 2 * 3 * 64 * 4
    tight = engine_over(smollm2, max_model_len=128, kv=per_token * 16 * 9)  # 144 slots for 6 x ~60 tokens
    squeezed = generate(tight, prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert squeezed == roomy
    assert [reason for _, reason in squeezed] == ["stop"] * len(prompts)  # 40 tokens hold any PERSON object
    for tokens, _ in squeezed:
        jsonschema.validate(json.loads(smollm2.tokenizer.decode(tokens)), PERSON)


@pytest.mark.parametrize("schema", ['{"type": "foo"}', '{"$ref": "#/$defs/missing"}', "not json"])
def test_bad_schemas_raise_grammar_error(schema, compiler):
    with pytest.raises(GrammarError):
        compiler.compile(json_schema_grammar(schema))


def test_length_bounded_strings_refuse_raw_control_characters(compiler):
    """xgrammar's own bounded-string rule lets a raw tab through (invalid JSON); ours must not."""
    schema = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 5}}, "required": ["q"]}
    grammar = compiler.compile(json_schema_grammar(json.dumps(schema)))
    assert not grammar.matcher([2]).accept_string('{"q": "a\tb')
    assert not grammar.matcher([2]).accept_string('{"q": "abcdef')
    matcher = grammar.matcher([2])
    assert matcher.accept_string('{"q": "abcé"}') and matcher.is_completed()


def test_without_stop_tokens_a_complete_grammar_ends_the_sequence(compiler, smollm2):  # noqa: F811
    grammar = compiler.compile(literal_grammar("yes"))
    engine = engine_over(smollm2)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, grammar=grammar)
    ((tokens, reason),) = generate(engine, [prompt(smollm2, "Say yes.")], [params])
    assert smollm2.tokenizer.decode(tokens) == "yes" and reason == "stop"
