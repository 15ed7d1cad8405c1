"""Paged KV cache bookkeeping: fixed-size blocks, block tables and prefix sharing by chained block hashes."""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable
from collections.abc import Sequence as Seq

from engine.sequence import Sequence

_HASH_KEY = os.urandom(32)  # per process: block digests cannot be predicted, so collisions cannot be crafted


def block_digest(previous: bytes, tokens: Seq[int], extra: Hashable) -> bytes:
    """Keyed BLAKE2b of a block's tokens chained to the digest of the blocks before it."""
    digest = hashlib.blake2b(previous, key=_HASH_KEY, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    digest.update(repr(extra).encode())
    return digest.digest()


class BlockManager:
    """Hands out cache blocks of ``block_size`` token slots.

    A full block is registered under a keyed digest of (previous block's digest, its tokens, ``extra``), where
    ``extra`` covers anything else that changes the cached keys (Qwen-1's NTK alpha). A new sequence reuses
    every leading block whose chain matches and whose stored tokens are its own (a digest alone is never
    trusted). A sequence keeps the digests of its full blocks, so each block is hashed once. Freed blocks keep
    their digest until they are handed out again, so a later request can still hit them (least recently freed go
    first). With ``resumable`` (hybrid models, whose linear layers' states no block restores) a hit is cut back to
    the longest prefix whose last block's digest it accepts (one with a state snapshot).
    """

    def __init__(self, num_blocks: int, block_size: int, resumable: Callable[[bytes], bool] | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.resumable = resumable
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._tokens_of: dict[int, tuple[int, ...]] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain(self, seq: Sequence, extra: Hashable) -> list[bytes]:
        """Digests of every full block of ``seq``'s tokens (those not yet in ``seq.block_hashes`` are added)."""
        hashes, size = seq.block_hashes, self.block_size
        for start in range(len(hashes) * size, len(seq) - size + 1, size):
            hashes.append(block_digest(hashes[-1] if hashes else b"", self._block_tokens(seq, start), extra))
        return hashes

    def _block_tokens(self, seq: Sequence, start: int) -> tuple[int, ...]:
        return tuple(seq.token_at(position) for position in range(start, start + self.block_size))

    def allocate(self, seq: Sequence, extra: Hashable = None, *, share: bool = True) -> bool:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks (unless not ``share``). False
        (nothing taken) when there are not enough free blocks."""
        hashes = self._chain(seq, extra) if share else []
        hits: list[int] = []
        for index, block_hash in enumerate(hashes):
            block = self._block_of.get(block_hash)
            if block is None or self._tokens_of[block] != self._block_tokens(seq, index * self.block_size):
                break
            hits.append(block)
        # Always compute at least the last token, so its logits exist.
        if len(hits) * self.block_size >= len(seq):
            hits.pop()
        while hits and self.resumable is not None and not self.resumable(hashes[len(hits) - 1]):
            hits.pop()
        fresh_needed = self.blocks_needed(len(seq)) - len(hits)
        reusable_free = sum(1 for b in hits if self._refs[b] == 0)
        if fresh_needed > self.num_free - reusable_free:
            return False
        for block in hits:
            self._take(block)
        table = list(hits)
        for _ in range(fresh_needed):
            table.append(self._take_fresh())
        seq.block_table = table
        seq.registered_blocks = len(hits)
        seq.num_computed = len(hits) * self.block_size
        self.prefix_queries += len(seq)
        self.prefix_hits += seq.num_computed
        return True

    def can_append(self, seq: Sequence) -> bool:
        """Whether ``seq`` can get a slot for one more token."""
        return len(seq.block_table) >= self.blocks_needed(len(seq)) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for ``seq``'s newest token."""
        if len(seq.block_table) < self.blocks_needed(len(seq)):
            seq.block_table.append(self._take_fresh())

    def reserve(self, seq: Sequence, tokens: int) -> int:
        """Give ``seq`` blocks for up to ``tokens`` positions while free ones last; how many positions it has."""
        while len(seq.block_table) < self.blocks_needed(tokens) and self._free:
            seq.block_table.append(self._take_fresh())
        return min(tokens, len(seq.block_table) * self.block_size)

    def register(self, seq: Sequence, extra: Hashable = None) -> None:
        """Offer ``seq``'s full blocks up to ``step_end`` for sharing (never a drafted token's): call once the step
        that computes them is scheduled, so no other sequence can hit a block before its keys are written (a sequence
        scheduled in the same step reads them after they are written, layer by layer)."""
        full = min(min(seq.step_end, len(seq)) // self.block_size, len(seq.block_table))
        if full <= seq.registered_blocks:
            return
        chain = self._chain(seq, extra)
        for index in range(seq.registered_blocks, full):
            self._register(seq.block_table[index], chain[index], self._block_tokens(seq, index * self.block_size))
        seq.registered_blocks = full

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.registered_blocks = 0

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def _take_fresh(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self._hash_of.pop(block, None)
        self._tokens_of.pop(block, None)
        if old is not None and self._block_of.get(old) == block:
            del self._block_of[old]
        self._refs[block] = 1
        return block

    def _register(self, block: int, block_hash: bytes, tokens: tuple[int, ...]) -> None:
        self._hash_of[block] = block_hash
        self._tokens_of[block] = tokens
        self._block_of.setdefault(block_hash, block)
