"""A hybrid model's state slots: seats, the prompt passes' slot, and prefix snapshots (least recently used replaced
first, never one a sequence is still to restore from; usable only once the step that writes them is done)."""

from __future__ import annotations

from engine.sampling import SamplingParams
from engine.sequence import Sequence
from engine.state_slots import StateSlots


def sequence() -> Sequence:
    return Sequence("r", [1, 2, 3], SamplingParams(), frozenset(), 4)


def test_slots_are_laid_out_seats_then_the_pass_slot_then_snapshots():
    slots = StateSlots(seats=2, snapshots=3)
    a, b = sequence(), sequence()
    slots.take(a)
    slots.take(b)
    assert {a.state_slot, b.state_slot} == {0, 1} and slots.pass_slot == 2 and slots.total == 6
    assert sorted(slots.snapshot(bytes([i])) for i in range(3)) == [3, 4, 5]
    slots.give_back(a)
    c = sequence()
    slots.take(c)
    assert c.state_slot == 0 and a.state_slot is None


def test_a_snapshot_is_resumable_after_its_step_and_replaced_least_recently_used_first():
    slots = StateSlots(seats=1, snapshots=2)
    first, second = slots.snapshot(b"a"), slots.snapshot(b"b")
    assert (first, second) == (2, 3)
    assert not slots.resumable(b"a") and slots.snapshot(b"a") is None  # pending, and kept once only
    slots.commit()
    assert slots.resumable(b"a") and slots.resumable(b"b")
    reader = sequence()
    slots.restore(reader, b"a")  # "a" is now the most recently used
    slots.restored(reader)  # and no longer held: only its use orders it
    assert slots.snapshot(b"c") == second and not slots.resumable(b"b")


def test_a_snapshot_being_restored_is_never_replaced():
    slots = StateSlots(seats=1, snapshots=1)
    kept = slots.snapshot(b"a")
    slots.commit()
    reader = sequence()
    slots.restore(reader, b"a")
    assert reader.restore_slot == kept and slots.snapshot(b"b") is None  # its only slot is held
    slots.restored(reader)
    assert reader.restore_slot is None and slots.snapshot(b"b") == kept
