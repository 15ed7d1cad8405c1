"""Grammar-constrained decoding with xgrammar: grammars compiled for one vocabulary, one matcher per sequence,
built from JSON schemas or literals.

A grammar is first described by a ``GrammarSpec`` (plain data, so it can cross to a worker process: see
``engine.grammar_worker``), then built and compiled. A request carries a compiled ``Grammar`` in its
``SamplingParams``; every sequence made from it gets its own matcher, fed each token it samples; the sampler masks
that row's logits (``engine.sampling.mask_logits``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar as xgr


def xgrammar() -> ModuleType:
    """xgrammar, imported on the first grammar: it imports transformers (about a second), which a server start or a
    request without a grammar never needs."""
    import xgrammar as module

    return module


class GrammarError(ValueError):
    """A grammar or JSON schema that cannot be compiled."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A grammar compiled for one vocabulary; ``matcher`` starts a fresh parse for one sequence."""

    compiled: xgr.CompiledGrammar

    def matcher(self, stop_ids: Iterable[int]) -> xgr.GrammarMatcher:
        """A parse that ends on one of ``stop_ids`` once the grammar is complete (with none: ends there)."""
        stops = sorted(stop_ids)
        return xgrammar().GrammarMatcher(self.compiled, override_stop_tokens=stops or None,
                                  terminate_without_stop_token=not stops)


class GrammarSpec(Protocol):
    """A grammar described as data (picklable), built into xgrammar's form with ``build``."""

    def build(self) -> xgr.Grammar: ...


@dataclass(frozen=True)
class SchemaGrammar:
    """Compact JSON (no free white space, so a weak model cannot stall in it) valid under a JSON schema."""

    schema: str

    def build(self) -> xgr.Grammar:
        parsed = json.loads(self.schema)
        try:
            return xgrammar().Grammar.from_json_schema(json.dumps(_bounded_strings_as_patterns(parsed)),
                                                any_whitespace=False, strict_mode=True)
        except RuntimeError as exc:
            raise GrammarError(_short(exc)) from exc


@dataclass(frozen=True)
class LiteralGrammar:
    """Exactly ``text``."""

    text: str

    def build(self) -> xgr.Grammar:
        escaped = self.text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return xgrammar().Grammar.from_ebnf(f'root ::= "{escaped}"')


@dataclass(frozen=True)
class RegexGrammar:
    """Text matching a regular expression (server-written patterns only: xgrammar's regex syntax)."""

    pattern: str

    def build(self) -> xgr.Grammar:
        try:
            return xgrammar().Grammar.from_regex(self.pattern)
        except RuntimeError as exc:
            raise GrammarError(_short(exc)) from exc


@dataclass(frozen=True)
class Concat:
    """Its parts one after another."""

    parts: tuple[GrammarSpec, ...]

    def build(self) -> xgr.Grammar:
        return xgrammar().Grammar.concat(*[part.build() for part in self.parts])


@dataclass(frozen=True)
class Union:
    """Any one of its options."""

    options: tuple[GrammarSpec, ...]

    def build(self) -> xgr.Grammar:
        return xgrammar().Grammar.union(*[option.build() for option in self.options])


def json_schema_grammar(schema: str) -> SchemaGrammar:
    """The grammar of compact JSON valid under ``schema`` (``GrammarError`` at once when it is not JSON)."""
    try:
        json.loads(schema)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GrammarError(f"the schema is not JSON that can be read: {exc}") from exc
    return SchemaGrammar(schema)


def literal_grammar(text: str) -> LiteralGrammar:
    return LiteralGrammar(text)


def tokenizer_info(tokenizer: Tokenizer, logits_width: int) -> xgr.TokenizerInfo:
    """xgrammar's view of a vocabulary: special tokens never match text; logits are ``logits_width`` wide."""
    vocab = [b"" if i in tokenizer.special_ids else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    return xgrammar().TokenizerInfo(vocab, xgrammar().VocabType.RAW, vocab_size=logits_width, stop_token_ids=stop)


def compile_spec(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    """Build ``spec`` and compile it; xgrammar's failures become ``GrammarError``."""
    try:
        return compiler.compile_grammar(spec.build())
    except RuntimeError as exc:
        raise GrammarError(_short(exc)) from exc


class GrammarCompiler:
    """Compiles grammars in this process against a tokenizer's vocabulary, for logits ``logits_width`` wide
    (cached per grammar). Grammars from untrusted input go to ``engine.grammar_worker`` instead."""

    def __init__(self, tokenizer: Tokenizer, logits_width: int, max_threads: int = 2) -> None:
        self._compiler = xgrammar().GrammarCompiler(tokenizer_info(tokenizer, logits_width), max_threads=max_threads)

    def compile(self, spec: GrammarSpec) -> Grammar:
        return Grammar(compile_spec(self._compiler, spec))


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


def _short(exc: Exception) -> str:
    """xgrammar's message without its source location prefix."""
    message = str(exc).strip()
    return message.split(": ", 1)[1] if message.startswith("[") and ": " in message else message
