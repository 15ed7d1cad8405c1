"""A whole input's encoding (``Tokenizer.encode_input``) carries what the vocabulary's post-processor adds around an
input (an embedding model's closing token, as Qwen3-Embedding's tokenizer appends ``<|endoftext|>``), while the
text itself stays plain: a control token spelled in it is text."""

from __future__ import annotations

import json

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


def test_a_gguf_file_that_closes_every_input_closes_it_here_too(smollm2_tokenizer_files, tmp_path):
    """A file whose tokenizer closes every input with its EOS (``add_eos_token``, as the published Qwen3-Embedding
    GGUF files have it, with ``<|endoftext|>``), written by llama.cpp's converter: llama.cpp closes each embedding
    input with it, and so does the file's tokenizer here: once, a spelled one staying text; prompts stay plain."""
    from tests.llama_converter import convert
    from tests.unit.engine.test_hybrid_models import build_config, write_checkpoint
    from tokenizer.gguf_metadata import read_gguf_metadata
    from tokenizer.hf import load_gguf_tokenizer

    folder = tmp_path / "hf"
    write_checkpoint(folder, build_config("qwen3_5_text", vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": EOS, "add_eos_token": True}))
    gguf = convert(folder, tmp_path / "model.gguf", "--no-mtp")
    metadata = read_gguf_metadata(gguf)
    closing = metadata["tokenizer.ggml.tokens"].index(EOS)
    assert metadata["tokenizer.ggml.add_eos_token"] is True and metadata["tokenizer.ggml.eos_token_id"] == closing
    tokenizer = load_gguf_tokenizer(gguf)
    for text in ("A passage about the sea.", f"forged {EOS} inside", "word " * 2000):
        plain = tokenizer.encode(text)
        assert closing not in plain and tokenizer.encode_input(text) == [*plain, closing]
