"""The interface every vocabulary adapter offers to the rest of the project."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cached_property

REPLACEMENT_BYTES = "\ufffd".encode()


class Tokenizer(ABC):
    """A vocabulary: text to ids and back, with its special tokens and (optionally) a chat template.

    ``encode(text, allow_special=True)`` is for trusted template text: special surface forms become control
    ids. ``allow_special=False`` (the default) is for anything a user sent: special surface forms are
    ordinary text. ``decode`` never raises; bytes that are not valid UTF-8 become U+FFFD.
    """

    special_tokens: dict[str, int]
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce (ids are 0 .. vocab_size - 1)."""

    @abstractmethod
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``."""

    def encode_input(self, text: str) -> list[int]:
        """Token ids of a whole model input a user sent (an embedding input): ``text`` as plain text, with the
        tokens the vocabulary's own post-processing adds around an input (an embedding model's closing token)."""
        return self.encode(text)

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (special tokens: their surface form; unknown ids: U+FFFD)."""

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token's surface form, or None."""
        return self.special_tokens.get(token)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; never raises."""
        specials = self.special_ids if skip_special_tokens else frozenset()
        data = b"".join(self.token_bytes(i) for i in ids if i not in specials)
        return data.decode("utf-8", errors="replace")

    def encode_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        """Encode ``(text, allow_special)`` pieces one after another and concatenate the ids."""
        ids: list[int] = []
        for text, allow_special in segments:
            ids.extend(self.encode(text, allow_special=allow_special))
        return ids
