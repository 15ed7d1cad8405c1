"""The Qwen-1 vocabulary (``qwen.tiktoken``) on tiktoken, with Qwen's pattern, NFC and special tokens."""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path

import tiktoken

from tokenizer.base import REPLACEMENT_BYTES, Tokenizer

PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_SURFACES = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
FIRST_SPECIAL_ID = 151643


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class QwenTokenizer(Tokenizer):
    """Qwen-1 tokenizer: byte-level BPE over ``qwen.tiktoken`` plus 208 special tokens."""

    def __init__(self, vocab_file: str | Path) -> None:
        ranks = load_ranks(vocab_file)
        first_special = max(ranks.values()) + 1
        if first_special != FIRST_SPECIAL_ID:
            raise ValueError(f"{vocab_file}: expected {FIRST_SPECIAL_ID} BPE ranks, found {first_special}")
        self.special_tokens = {tok: first_special + i for i, tok in enumerate(SPECIAL_SURFACES)}
        self._encoding = tiktoken.Encoding(
            "qwen", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._id_bytes: list[bytes] = [b""] * (first_special + len(SPECIAL_SURFACES))
        for token, rank in ranks.items():
            self._id_bytes[rank] = token
        for surface, token_id in self.special_tokens.items():
            self._id_bytes[token_id] = surface.encode()
        self.eos_token_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._encoding.encode(text, allowed_special="all", disallowed_special=())
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """Encode many texts at once on tiktoken's thread pool."""
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        if allow_special:
            return self._encoding.encode_batch(texts, allowed_special="all", disallowed_special=())
        return self._encoding.encode_ordinary_batch(texts)

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._id_bytes):
            return self._id_bytes[token_id]
        return REPLACEMENT_BYTES
