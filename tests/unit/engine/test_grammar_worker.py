"""Grammars compiled in worker processes: a schema that crashes or stalls xgrammar costs a worker, not the server."""

from __future__ import annotations

import json

import pytest

from engine.grammar import GrammarError, json_schema_grammar, tokenizer_info
from engine.grammar_worker import IsolatedGrammarCompiler
from tests.unit.engine.test_async_engine import smollm2  # noqa: F401

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def ref_chain(links: int) -> str:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(links)}
    defs[f"d{links}"] = {"type": "string"}
    return json.dumps({"$defs": defs, "$ref": "#/$defs/d0"})


def long_strings(length: int) -> str:
    return json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": length}
                                                         for i in range(3)}})


@pytest.fixture(scope="module")
def isolated(smollm2):  # noqa: F811
    compiler = IsolatedGrammarCompiler(lambda: tokenizer_info(smollm2.tokenizer, smollm2.config.vocab_size), workers=1,
                                       timeout=5, cache_limit_bytes=16 << 20)
    yield compiler
    compiler.close()


def accepts_person(compiler: IsolatedGrammarCompiler) -> bool:
    matcher = compiler.compile(json_schema_grammar(json.dumps(PERSON))).matcher([2])
    return matcher.accept_string('{"name": "Ada"}') and matcher.is_completed()


def test_compiled_in_a_worker_constrains_like_in_process(isolated):
    assert accepts_person(isolated)
    assert not isolated.compile(json_schema_grammar(json.dumps(PERSON))).matcher([2]).accept_string('{"age"')


def test_a_schema_that_crashes_xgrammar_fails_alone(isolated):
    with pytest.raises(GrammarError, match="crashed"):
        isolated.compile(json_schema_grammar(ref_chain(20_000)))  # a segmentation fault in xgrammar's converter
    assert accepts_person(isolated)  # a fresh worker took over


def test_a_schema_that_stalls_xgrammar_runs_out_of_time(isolated):
    with pytest.raises(GrammarError, match="within 5 s"):
        isolated.compile(json_schema_grammar(long_strings(5000)))  # ~20 s of xgrammar's pattern lowering
    assert accepts_person(isolated)


def test_errors_from_xgrammar_come_back_as_grammar_errors(isolated):
    with pytest.raises(GrammarError, match="missing"):
        isolated.compile(json_schema_grammar('{"$ref": "#/$defs/missing"}'))
