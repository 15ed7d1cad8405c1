"""The Qwen tokenizer against vectors recorded from the original tokenization_qwen.py."""

from __future__ import annotations

import pytest

from tests.conftest import load_fixture

VECTORS = load_fixture("qwen1/tokenizer-vectors.json")
CASES = VECTORS["cases"]


def test_vocabulary_size_and_special_ids(qwen_tokenizer):
    assert qwen_tokenizer.vocab_size == VECTORS["len_tokenizer"] == 151851
    for surface, token_id in VECTORS["special_ids"].items():
        if surface != "eod_id":
            assert qwen_tokenizer.token_to_id(surface) == token_id
    assert qwen_tokenizer.eos_token_id == VECTORS["special_ids"]["eod_id"]
    assert qwen_tokenizer.encode("\n") == VECTORS["nl_ids"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_encode_with_specials_allowed(qwen_tokenizer, case):
    ids = qwen_tokenizer.encode(case["text"], allow_special=True)
    assert ids == case["ids_allowed_special_all"]
    assert qwen_tokenizer.decode(ids) == case["decode_all"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_encode_user_text_keeps_specials_plain(qwen_tokenizer, case):
    ids = qwen_tokenizer.encode(case["text"])
    assert ids == case["ids_allowed_special_none"]
    assert qwen_tokenizer.decode(ids) == case["decode_none"]
    assert not set(ids) & qwen_tokenizer.special_ids


DECODE_CASES = [c for c in VECTORS["decode_cases"] if c["errors"] == "replace"]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c["note"] for c in DECODE_CASES])
def test_decode_partial_characters_and_skip_specials(qwen_tokenizer, case):
    assert qwen_tokenizer.decode(case["ids"], skip_special_tokens=case["skip_special_tokens"]) == case["text"]


def test_decode_never_raises_on_ids_outside_the_vocabulary(qwen_tokenizer):
    assert qwen_tokenizer.decode([9707, 151900, -1, 10**9]) == "Hello\ufffd\ufffd\ufffd"
