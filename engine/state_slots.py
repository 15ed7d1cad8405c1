"""Which slot of a hybrid model's ``StateCache`` holds what: running sequences' states, the prompt passes' slot, and
snapshots of cached prefixes' states (the KV blocks of a prefix cannot restore a linear layer's state; a snapshot
taken where the prefix ends can)."""

from __future__ import annotations

from collections import Counter, OrderedDict

from engine.sequence import Sequence


class StateSlots:
    """Slots for running sequences (a group of ``group`` each, from admission until it finishes or is preempted: as
    many groups as seats, so admission never waits; a sequence's states are in one slot of its group, which
    speculative decoding moves between them, the others holding the states after each drafted token), then one slot
    for the prompt passes, then ``snapshots`` slots holding the
    states at the end of cached prefixes, keyed by the digest of the prefix's last block (least recently used go
    first; never one a sequence is still to restore from). A snapshot is written during a step and can be restored
    from once that step is done (``commit``)."""

    def __init__(self, seats: int, snapshots: int, group: int = 1) -> None:
        self.seats = seats
        self.snapshots = snapshots
        self.group = group
        self.running_slots = seats * group
        self.pass_slot = self.running_slots
        self._free = list(range(self.running_slots - group, -1, -group))
        self._free_snapshots = list(range(self.pass_slot + snapshots, self.pass_slot, -1))
        self._ready: OrderedDict[bytes, int] = OrderedDict()
        self._pending: dict[bytes, int] = {}
        self._held: Counter[int] = Counter()  # snapshot slots sequences are still to restore from

    @property
    def total(self) -> int:
        """Slots the state cache needs."""
        return self.running_slots + 1 + self.snapshots

    def round_slots(self, seq: Sequence, count: int) -> list[int]:
        """Where ``seq``, verifying ``count`` - 1 drafted tokens, keeps its states: the slot each of its ``count``
        tokens' rounds writes (its group's other slots in order, then its own, which the last round advances; a
        sequence that accepts ``a`` drafted tokens then holds the state after them in the ``a``-th)."""
        assert seq.state_slot is not None and seq.slot_group is not None
        others = [slot for slot in range(seq.slot_group, seq.slot_group + self.group) if slot != seq.state_slot]
        return [*others[: count - 1], seq.state_slot]

    def take(self, seq: Sequence) -> None:
        seq.state_slot = seq.slot_group = self._free.pop()

    def give_back(self, seq: Sequence) -> None:
        if seq.slot_group is not None:
            self._free.append(seq.slot_group)
        self.restored(seq)
        seq.state_slot = seq.slot_group = seq.snapshot = None

    def resumable(self, digest: bytes) -> bool:
        """Whether a prefix ending with the block of ``digest`` has a snapshot to resume from."""
        return digest in self._ready

    def restore(self, seq: Sequence, digest: bytes) -> None:
        """``seq`` starts from the snapshot of ``digest`` (copied into its slot before its first step computes)."""
        seq.restore_slot = self._ready[digest]
        self._held[seq.restore_slot] += 1
        self._ready.move_to_end(digest)

    def restored(self, seq: Sequence) -> None:
        """``seq``'s snapshot was copied into its slot (or it left before): the snapshot may be replaced again."""
        if seq.restore_slot is not None:
            self._held[seq.restore_slot] -= 1
            seq.restore_slot = None

    def snapshot(self, digest: bytes) -> int | None:
        """A slot for the state at the end of the prefix of ``digest`` (a free one, else the least recently used
        snapshot's); None when it is kept already or no slot can be had."""
        if digest in self._ready or digest in self._pending:
            return None
        if self._free_snapshots:
            slot = self._free_snapshots.pop()
        else:
            oldest = next((d for d, s in self._ready.items() if self._held[s] <= 0), None)
            if oldest is None:
                return None
            slot = self._ready.pop(oldest)
        self._pending[digest] = slot
        return slot

    def commit(self) -> None:
        """The step that wrote the pending snapshots is done: they can be restored from."""
        self._ready.update(self._pending)
        self._pending.clear()
