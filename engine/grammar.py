"""Grammar-constrained decoding with xgrammar: grammars compiled for one vocabulary, one matcher per sequence,
built from JSON schemas or EBNF.

A request carries a compiled ``Grammar`` in its ``SamplingParams``; every sequence made from it gets its own
matcher, fed each token it samples; the sampler masks that row's logits (``engine.sampling.mask_logits``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from tokenizer import Tokenizer


class GrammarError(ValueError):
    """A grammar or JSON schema that cannot be compiled."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A grammar compiled for one vocabulary; ``matcher`` starts a fresh parse for one sequence."""

    compiled: xgr.CompiledGrammar

    def matcher(self, stop_ids: Iterable[int]) -> xgr.GrammarMatcher:
        """A parse that ends on one of ``stop_ids`` once the grammar is complete (with none: ends there)."""
        stops = sorted(stop_ids)
        return xgr.GrammarMatcher(self.compiled, override_stop_tokens=stops or None,
                                  terminate_without_stop_token=not stops)


class GrammarCompiler:
    """Compiles grammars against a tokenizer's vocabulary, for logits ``logits_width`` wide (cached per grammar)."""

    def __init__(self, tokenizer: Tokenizer, logits_width: int, max_threads: int = 2) -> None:
        vocab = [b"" if i in tokenizer.special_ids else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=logits_width, stop_token_ids=stop)
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads)

    def compile(self, grammar: xgr.Grammar) -> Grammar:
        try:
            return Grammar(self._compiler.compile_grammar(grammar))
        except RuntimeError as exc:
            raise GrammarError(str(exc)) from exc


def json_schema_grammar(schema: str) -> xgr.Grammar:
    """Compact JSON (no free white space, so a weak model cannot stall in it) valid under ``schema``."""
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"the schema is not JSON: {exc}") from exc
    try:
        return xgr.Grammar.from_json_schema(json.dumps(_bounded_strings_as_patterns(parsed)), any_whitespace=False,
                                            strict_mode=True)
    except RuntimeError as exc:
        raise GrammarError(_short(exc)) from exc


def _bounded_strings_as_patterns(schema: Any) -> Any:
    """xgrammar lowers a string with minLength/maxLength to a character class that lets raw control characters
    (a tab, NUL) into the JSON string; its ``pattern`` path is JSON-aware. So a length-bounded string without a
    pattern becomes the same length bound over characters that need no escaping."""
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    node = {key: _bounded_strings_as_patterns(value) for key, value in schema.items()}
    bounded = "minLength" in node or "maxLength" in node
    if node.get("type") == "string" and bounded and "pattern" not in node and "format" not in node:
        low, high = node.pop("minLength", 0), node.pop("maxLength", "")
        node["pattern"] = f"^[^\"\\\\\\x00-\\x1f]{{{low},{high}}}$"
    return node


def literal_grammar(text: str) -> xgr.Grammar:
    """Exactly ``text``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return xgr.Grammar.from_ebnf(f'root ::= "{escaped}"')


def _short(exc: Exception) -> str:
    """xgrammar's message without its source location prefix."""
    message = str(exc).strip()
    return message.split(": ", 1)[1] if message.startswith("[") and ": " in message else message
