"""Server-side fixtures: a grammar compiler for the embedded SmolLM2 vocabulary."""

from __future__ import annotations

import pytest

from engine.grammar import GrammarCompiler


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(smollm2_tokenizer, smollm2_tokenizer.vocab_size)
