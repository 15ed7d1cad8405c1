"""Incremental detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import codecs

from tokenizer.base import Tokenizer


class IncrementalDetokenizer:
    """Feed token ids one at a time; get text deltas whose concatenation equals ``tokenizer.decode``.

    Byte-level BPE splits CJK characters and emoji across tokens: the UTF-8 decoder holds back an incomplete
    character until the bytes that finish it arrive (``flush`` releases whatever is left, as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._skipped = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes (possibly empty)."""
        if token_id in self._skipped:
            return ""
        return self._decoder.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end of the sequence."""
        return self._decoder.decode(b"", final=True)
