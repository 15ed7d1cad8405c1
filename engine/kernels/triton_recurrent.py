"""The gated delta rule of a hybrid model's linear layers as Triton kernels (CUDA; the tests run them on CPU tensors
under ``TRITON_INTERPRET=1``). ``delta_rule``: every row of a call, one new token (decode) or a few, advances its
state in place, token by token, in the recurrent form's order of operations. Torch's form on a card gathers the
states, runs six elementwise kernels and a reduction per token and scatters them back; here each program keeps one
value block of one head's state in registers over all of the row's tokens, reading and writing it once.

``scan``: a prompt of a chunk or more takes the chunked form instead. Its per-chunk terms (``ChunkTerms``: the WY
system solved within every chunk at once) are batched torch ops; the chunks then carry the state one after
another, and that sequential part is one kernel: each program keeps one value block of one head's state in
registers across all chunks, three tensor-core matmuls a chunk (the state's corrections, the chunk's outputs, the
state it leaves), where torch's loop launches a handful of kernels per chunk.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.linear_attention import ChunkTerms


def value_block(value_dim: int) -> int:
    """State columns per program: 32, or 16 for value dims that are not a multiple of 32."""
    return 32 if value_dim % 32 == 0 else 16


def fits(key_dim: int, value_dim: int) -> bool:
    """Whether the kernel takes heads of these sizes (a power-of-two key dim; value dims in whole blocks)."""
    return key_dim & (key_dim - 1) == 0 and 16 <= key_dim <= 256 and value_dim % 16 == 0


@cache
def _kernel() -> Any:
    """Built on first use, so that ``TRITON_INTERPRET`` set by then decides how it runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def delta_rule_rows(q_ptr, k_ptr, v_ptr, decay_ptr, beta_ptr, out_ptr, state_ptr, starts_ptr, counts_ptr,
                        slots_ptr, kept_after_ptr, kept_slots_ptr, heads, KEY: tl.constexpr, VALUE: tl.constexpr,
                        BLOCK: tl.constexpr):
        row, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, count = tl.load(starts_ptr + row), tl.load(counts_ptr + row)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        kept_after, kept_slot = tl.load(kept_after_ptr + row), tl.load(kept_slots_ptr + row).to(tl.int64)
        keys = tl.arange(0, KEY)
        values = block * BLOCK + tl.arange(0, BLOCK)
        within = head * KEY * VALUE + keys[:, None] * VALUE + values[None, :]
        slot_size = heads * KEY * VALUE
        state = tl.load(state_ptr + slot * slot_size + within)
        for t in range(count):
            token_head = (start + t).to(tl.int64) * heads + head
            q = tl.load(q_ptr + token_head * KEY + keys)
            k = tl.load(k_ptr + token_head * KEY + keys)
            v = tl.load(v_ptr + token_head * VALUE + values)
            state = state * tl.exp(tl.load(decay_ptr + token_head))
            remembered = tl.sum(state * k[:, None], axis=0)
            delta = (v - remembered) * tl.load(beta_ptr + token_head)
            state = state + k[:, None] * delta[None, :]
            tl.store(out_ptr + token_head * VALUE + values, tl.sum(state * q[:, None], axis=0))
            if t + 1 == kept_after:  # a prefix snapshot: the state after this many of the row's tokens
                tl.store(state_ptr + kept_slot * slot_size + within, state)
        tl.store(state_ptr + slot * slot_size + within, state)

    return delta_rule_rows


@cache
def _scan_kernel() -> Any:
    """Built on first use, as ``_kernel``."""
    import triton
    import triton.language as tl

    @triton.jit
    def scan_chunks(values_ptr, key_decay_ptr, within_ptr, q_decayed_ptr, k_to_end_ptr, chunk_decay_ptr, out_ptr,
                    state_ptr, slot, chunks, KEY: tl.constexpr, VALUE: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr):
        head, block = tl.program_id(0), tl.program_id(1)
        heads = tl.num_programs(0)
        keys, rows = tl.arange(0, KEY), tl.arange(0, CHUNK)
        columns = block * BLOCK + tl.arange(0, BLOCK)
        at = slot.to(tl.int64) * heads * KEY * VALUE + head * KEY * VALUE + keys[:, None] * VALUE + columns[None, :]
        state = tl.load(state_ptr + at)
        for i in range(chunks):
            chunk = (head * chunks + i).to(tl.int64)
            by_key = chunk * CHUNK * KEY + rows[:, None] * KEY + keys[None, :]
            by_value = chunk * CHUNK * VALUE + rows[:, None] * VALUE + columns[None, :]
            corrected = tl.load(values_ptr + by_value) - tl.dot(tl.load(key_decay_ptr + by_key), state,
                                                                input_precision="ieee")
            within = tl.load(within_ptr + chunk * CHUNK * CHUNK + rows[:, None] * CHUNK + rows[None, :])
            out = tl.dot(tl.load(q_decayed_ptr + by_key), state, input_precision="ieee")
            tl.store(out_ptr + by_value, out + tl.dot(within, corrected, input_precision="ieee"))
            state = state * tl.load(chunk_decay_ptr + chunk) + tl.dot(tl.trans(tl.load(k_to_end_ptr + by_key)),
                                                                       corrected, input_precision="ieee")
        tl.store(state_ptr + at, state)

    return scan_chunks


def scan(states: torch.Tensor, slot: int, terms: ChunkTerms) -> torch.Tensor:
    """``linear_attention.scan_chunks`` on the kernel: the chunks of ``terms`` (fp32) one after another from the
    state in ``slot`` of ``states`` ([slots, H, K, V], fp32, advanced in place). [H, N * CHUNK, V]."""
    heads, key_dim, value_dim = states.shape[1:]
    assert states.is_contiguous() and states.dtype == torch.float32 and fits(key_dim, value_dim)
    chunks, chunk = terms.values.shape[1:3]
    parts = [x.float().contiguous() for x in (terms.values, terms.key_decay, terms.within, terms.q_decayed,
                                               terms.k_to_end, terms.chunk_decay)]
    out = torch.empty_like(parts[0])
    block = value_block(value_dim)
    _scan_kernel()[(heads, value_dim // block)](*parts, out, states, slot, chunks, KEY=key_dim, VALUE=value_dim,
                                                BLOCK=block, CHUNK=chunk)
    return out.reshape(heads, -1, value_dim)


def delta_rule(states: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor,
               kept_after: torch.Tensor, kept_slots: torch.Tensor) -> torch.Tensor:
    """Rows ``i`` of ``slots``/``starts``/``counts`` [R] (int32) take tokens ``starts[i]`` to ``starts[i] +
    counts[i]`` of the packed ``q``, ``k`` [N, H, K], ``v`` [N, H, V], ``decay`` (log), ``beta`` [N, H] (all fp32)
    through the state ``states[slots[i]]`` ([slots, H, K, V], fp32, advanced in place); a row whose ``kept_after``
    is positive also leaves its state after that many tokens in slot ``kept_slots[i]``. Returns the outputs [N, H, V]
    (rows no row covers stay uninitialised)."""
    heads, key_dim, value_dim = states.shape[1:]
    assert states.is_contiguous() and states.dtype == torch.float32 and fits(key_dim, value_dim)
    q, k, v, decay, beta = (x.float().contiguous() for x in (q, k, v, decay, beta))
    out = torch.empty_like(v)
    block = value_block(value_dim)
    grid = (slots.shape[0], heads, value_dim // block)
    _kernel()[grid](q, k, v, decay, beta, out, states, starts, counts, slots, kept_after, kept_slots, heads,
                    KEY=key_dim, VALUE=value_dim, BLOCK=block)
    return out


def decode(states: torch.Tensor, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           decay: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One token for each of R rows (row i: token i, slot ``slots[i]``): ``recurrent_update`` on the states in
    place. [R, H, V]."""
    rows = slots.shape[0]
    index = torch.arange(rows, dtype=torch.int32, device=q.device)
    ones, zeros = torch.ones_like(index), torch.zeros_like(index)
    return delta_rule(states, slots.to(torch.int32), index, ones, q, k, v, decay, beta, zeros, zeros)


def prompt(states: torch.Tensor, slot: int, kept: tuple[int, int] | None, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """T tokens of one row from the state in ``slot`` (``chunked_delta_rule``'s result); ``kept`` (tokens, slot):
    the state after that many tokens also goes to that slot. [T, H, V]. The row's numbers are filled on the device
    (no upload)."""
    after, kept_slot = kept if kept is not None else (-1, 0)
    if after == 0:
        states[kept_slot] = states[slot]
    slots, starts, counts, kept_after, kept_slots = (torch.full((1,), value, dtype=torch.int32, device=q.device)
                                                     for value in (slot, 0, q.shape[0], after, kept_slot))
    return delta_rule(states, slots, starts, counts, q, k, v, decay, beta, kept_after, kept_slots)
