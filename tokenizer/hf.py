"""Adapter over HF ``tokenizers``: from a ``tokenizer.json`` folder or from the vocabulary inside a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer

from tokenizer.base import REPLACEMENT_BYTES, Tokenizer

# Split patterns of the GGUF ``tokenizer.ggml.pre`` names we support (llama.cpp's names).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), _byte_level(False)]
    )


_GGUF_PRE_TOKENIZERS = {
    "gpt-2": lambda: _byte_level(True),
    "default": lambda: _byte_level(True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]
    ),
    "qwen2": lambda: _split(_QWEN2_SPLIT),
    "llama-bpe": lambda: _split(_LLAMA3_SPLIT),
}


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping



GIL_FREE_CHARS = 4096  # texts longer than this are encoded without holding the GIL

class HFTokenizer(Tokenizer):
    """A byte-level BPE vocabulary held by HF ``tokenizers``."""

    def __init__(
        self,
        raw: RawTokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        serialized = raw.to_str()
        if json.loads(serialized).get("decoder", {}).get("type") != "ByteLevel":
            raise ValueError("only byte-level BPE tokenizers (GPT-2, Qwen2, Llama-3, SmolLM style) are supported")
        self._raw = raw
        self._plain = RawTokenizer.from_str(serialized)
        self._plain.encode_special_tokens = True
        self.special_tokens = {
            tok.content: tok_id for tok_id, tok in raw.get_added_tokens_decoder().items() if tok.special
        }
        byte_of = _unicode_to_byte()
        self._id_bytes: list[bytes] = [b""] * raw.get_vocab_size(with_added_tokens=True)
        for token, token_id in raw.get_vocab(with_added_tokens=True).items():
            if token in self.special_tokens or token_id in raw.get_added_tokens_decoder():
                self._id_bytes[token_id] = token.encode()
            else:
                self._id_bytes[token_id] = bytes(byte_of[ch] for ch in token)
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.eos_token_id = raw.token_to_id(eos_token) if eos_token else None
        self.bos_token_id = raw.token_to_id(bos_token) if bos_token else None
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """Load ``tokenizer.json`` plus the eos/bos tokens and chat template of ``tokenizer_config.json``."""
        folder = Path(folder)
        raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()

        def surface(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        return cls(
            raw,
            eos_token=surface(config.get("eos_token")),
            bos_token=surface(config.get("bos_token")),
            chat_template=template,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> HFTokenizer:
        """Build the tokenizer from GGUF ``tokenizer.ggml.*`` metadata (a ``gpt2``-model vocabulary)."""
        if metadata.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {metadata.get('tokenizer.ggml.model')!r}")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        raw = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
        raw.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
        raw.decoder = decoders.ByteLevel()
        types = metadata.get("tokenizer.ggml.token_type", [])
        raw.add_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types)
             if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
        )

        def token_at(key: str) -> str | None:
            index = metadata.get(key)
            return tokens[index] if index is not None else None

        template = _input_template(metadata, tokens)
        if template is not None:
            raw.post_processor = template
        return cls(
            raw,
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Long texts go through ``encode_batch``, which lets go of the GIL while it works
        (``encode`` holds it throughout: seconds for megabytes, during which no other thread runs)."""
        encoder = self._raw if allow_special else self._plain
        if len(text) > GIL_FREE_CHARS:
            return encoder.encode_batch([text], add_special_tokens=False)[0].ids
        return encoder.encode(text, add_special_tokens=False).ids

    def encode_input(self, text: str) -> list[int]:
        if len(text) > GIL_FREE_CHARS:
            return self._plain.encode_batch([text], add_special_tokens=True)[0].ids
        return self._plain.encode(text, add_special_tokens=True).ids

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._id_bytes):
            return self._id_bytes[token_id]
        return REPLACEMENT_BYTES


def _input_template(metadata: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing | None:
    """What llama.cpp adds around a whole input (``add_special``): the BOS and EOS tokens where the file's
    ``add_bos_token``/``add_eos_token`` say so (Qwen3-Embedding's files close every input with its EOS)."""
    added = {side: index for side in ("bos", "eos") if metadata.get(f"tokenizer.ggml.add_{side}_token")
             and (index := metadata.get(f"tokenizer.ggml.{side}_token_id")) is not None}
    if not added:
        return None
    bos, eos = (tokens[added[side]] if side in added else None for side in ("bos", "eos"))
    return processors.TemplateProcessing(single=[t for t in (bos, "$A", eos) if t is not None],
                                         special_tokens=[(tokens[i], i) for i in added.values()])


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer embedded in a GGUF file."""
    from tokenizer.gguf_metadata import read_gguf_metadata

    return HFTokenizer.from_gguf_metadata(read_gguf_metadata(path))
