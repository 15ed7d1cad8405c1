"""A whole input's encoding (``Tokenizer.encode_input``) carries what the vocabulary's post-processor adds around an
input (an embedding model's closing token, as Qwen3-Embedding's tokenizer appends ``<|endoftext|>``), while the
text itself stays plain: a control token spelled in it is text."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from tokenizer.hf import HFTokenizer

EOS = "<|endoftext|>"


def vocabulary(post_processed: bool) -> HFTokenizer:
    raw = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    if post_processed:
        raw.post_processor = processors.TemplateProcessing(single=f"$A {EOS}",
                                                           special_tokens=[(EOS, raw.token_to_id(EOS))])
    return HFTokenizer(raw)


def test_an_input_gets_the_closing_token_its_post_processor_adds():
    tokenizer = vocabulary(post_processed=True)
    eos = tokenizer.special_tokens[EOS]
    assert tokenizer.encode_input("hi") == [*tokenizer.encode("hi"), eos]
    assert eos not in tokenizer.encode("hi")  # prompts and /tokenize are untouched
    forged = tokenizer.encode_input(f"a{EOS}")
    assert forged == [*tokenizer.encode(f"a{EOS}"), eos] and forged.count(eos) == 1  # the spelled one is text
    long_text = "word " * 20_000  # the GIL-free batch path
    assert tokenizer.encode_input(long_text) == [*tokenizer.encode(long_text), eos]


def test_without_a_post_processor_an_input_is_its_plain_text():
    tokenizer = vocabulary(post_processed=False)
    assert tokenizer.encode_input("hi") == tokenizer.encode("hi")
