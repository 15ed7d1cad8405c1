"""Turns a scheduled batch into model inputs (packed tokens, slots, the attention layout) and runs it."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.kv_store import KVCache, LayerCache
from engine.layers import inverse_frequencies, qwen_ntk_alpha
from engine.linear_attention import DecodeRound, LayerState, RecurrentStep, StateCache
from engine.model import DecoderModel, PaddedLayout, PagedLayout, StepInputs, VarlenLayout
from engine.sequence import Sequence
from engine.transfer import to_device


class ModelRunner:
    """Owns the model and its KV cache (``KVCache``). The cache has one page more than the block manager hands out:
    padding rows of a captured decode step write there. A hybrid model's linear layers keep ``state_slots``
    sequences' states (``StateCache``); each sequence names its slot (``Sequence.state_slot``)."""

    def __init__(self, model: DecoderModel, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto", state_slots: int = 0) -> None:
        self.model, self.config = model, config
        self.block_size, self.device, self.dtype = block_size, device, dtype
        if device.type == "cuda":
            # cuDNN's attention builds an execution plan for every new key length: ~10 ms of host time per call,
            # every decode step (torch 2.11 on an H200); the flash / memory-efficient kernels take any length.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.scratch_page = num_blocks
        self.kv_cache = KVCache(config, (num_blocks + 1) * block_size, dtype, device, kv_cache_dtype)
        self.states = StateCache(config, state_slots, device) if config.hybrid else None
        self.caches = self._layer_caches()
        alphas = ntk_alphas(config.max_model_len, config.seq_length) if config.use_dynamic_ntk else [1.0]
        self.alpha_index = {alpha: index for index, alpha in enumerate(alphas)}
        self.inv_freq = torch.stack([inverse_frequencies(config.rotated_dim, config.rope_theta, alpha)
                                     for alpha in alphas]).to(device)  # [alphas, D / 2]
        self.decode_graphs: DecodeStep | None = None
        self.followers: Followers | None = None  # tensor parallelism: the other ranks, told every step first
        self._hidden: torch.Tensor | None = None

    def _layer_caches(self) -> list[LayerCache | LayerState]:
        """What each layer reads and writes, in layer order: keys and values, or a linear layer's states."""
        kv, states = iter(self.kv_cache.layers), iter(self.states.layers if self.states is not None else ())
        linear = set(self.config.linear_layers)
        return [next(states) if i in linear else next(kv) for i in range(self.config.num_layers)]

    @property
    def draft_cache(self) -> LayerCache:
        """The multi-token-prediction block's keys and values (the cache's last attention layer)."""
        return self.kv_cache.layers[-1]

    def use_decode_graphs(self, graphs: DecodeStep | None) -> None:
        """Run the decode steps ``graphs`` fits on it (CUDA graphs), the rest eagerly."""
        self.decode_graphs = graphs

    @torch.inference_mode()
    def run(self, batch: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Compute every sequence's tokens from ``num_computed`` to ``step_end``; fp32 logits of each last one."""
        if not all_logits and self.decode_graphs is not None and self.decode_graphs.fits(batch):
            return self.decode_graphs.run(batch)
        return self.execute(Command.RUN, *self.plan(batch), all_logits)

    @torch.inference_mode()
    def hidden(self, batch: list[Sequence]) -> torch.Tensor:
        """The last layer's output for every new token of ``batch`` (packed); ``head`` turns rows into logits."""
        return self.execute(Command.HIDDEN, *self.plan(batch))

    @torch.inference_mode()
    def head(self, rows: slice | list[int] = slice(None)) -> torch.Tensor:
        """fp32 logits of ``rows`` (a range, or packed indices) of the last ``hidden`` result."""
        return self.execute(Command.HEAD, None, None, rows)

    @torch.inference_mode()
    def draft(self, rows: list[DraftRows], hidden: torch.Tensor, from_model: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The multi-token-prediction block over ``rows`` (``hidden``: their input hidden states, packed in order;
        ``from_model``: the model's last-layer output, else the block's own): at each one's last row, the block's
        normed output and fp32 logits (``DecoderModel.draft``)."""
        ints, shape = self.plan(rows, states=False)
        token_ids, inputs = self.step_inputs(to_device(ints, torch.long, self.device), shape)
        return self.model.draft(token_ids, hidden, inputs, self.draft_cache, from_model)

    def execute(self, command: Command, ints: np.ndarray | None, shape: StepShape | None,
                extra: object = None) -> torch.Tensor:
        """Run one command on this rank (after sending it to the followers, if any): ``RUN`` a step (``extra``:
        all logits), ``HIDDEN`` a step's last hidden states (kept for ``HEAD``), ``HEAD`` logits of kept rows
        (``extra``: a slice, or a list of packed indices)."""
        if self.followers is not None:
            self.followers.send(command, ints, shape, extra)
        if command is Command.HEAD:
            assert self._hidden is not None, "HEAD follows HIDDEN"
            rows = extra if isinstance(extra, slice) else to_device(extra, torch.long, self.device)
            return self.model.head(self._hidden[rows])
        assert ints is not None and shape is not None
        token_ids, inputs = self.inputs(ints, shape)
        if command is Command.HIDDEN:
            self._hidden = self.model.hidden(token_ids, inputs, self.caches)
            return self._hidden
        return self.model(token_ids, inputs, self.caches, all_logits=bool(extra))

    def host_ints(self, batch: list[Sequence] | list[DraftRows], width: int, rows: int | None = None,
                  states: bool = True) -> np.ndarray:
        """Every integer a step needs, in ``StepShape`` order: tokens, positions, new-token counts, key counts, NTK
        alpha indices, block tables padded to ``width`` pages. ``rows`` > len(batch) adds padding rows (one token
        at position 0 in the scratch page) for a captured step of that many rows. Filled in one int64 array: a
        captured step's tables are ``rows`` x the longest context's pages, mostly padding. A hybrid model's step
        ends with each row's states (``state_ints``), unless not ``states``."""
        rows = rows or len(batch)
        q_lens = [s.step_end - s.num_computed for s in batch]
        n = sum(q_lens) + rows - len(batch)
        state_slots = STATE_INTS * rows if self.states is not None and states else 0
        ints = np.empty(2 * n + 3 * rows + rows * width + state_slots, dtype=np.int64)
        if state_slots:
            ints[-state_slots:] = np.array([state_ints(seq) for seq in batch]).T.reshape(-1)
        tokens, positions, q_len_t, kv_len_t, alpha_t, tables = np.split(ints[: len(ints) - state_slots],
                                                                         np.cumsum([n, n, rows, rows, rows]))
        tables = tables.reshape(rows, width)
        tables.fill(self.scratch_page)
        at = 0
        for row, (seq, q_len) in enumerate(zip(batch, q_lens, strict=True)):
            end = seq.step_end
            tokens[at : at + q_len] = seq.step_tokens()
            positions[at : at + q_len] = np.arange(seq.num_computed, end)
            q_len_t[row], kv_len_t[row], alpha_t[row] = q_len, end, self.alpha_index[seq.ntk_alpha]
            tables[row, : len(seq.block_table)] = seq.block_table
            at += q_len
        tokens[at:], positions[at:] = 0, 0  # padding rows: one token at position 0, one key, the first alpha
        q_len_t[len(batch) :], kv_len_t[len(batch) :], alpha_t[len(batch) :] = 1, 1, 0
        return ints

    def plan(self, batch: list[Sequence] | list[DraftRows], states: bool = True) -> tuple[np.ndarray, StepShape]:
        """Every integer of the step (``host_ints``) and its shape: all any rank needs to run it."""
        q_lens = [s.step_end - s.num_computed for s in batch]
        kv_lens = [s.step_end for s in batch]
        width = max(len(s.block_table) for s in batch)
        shape = StepShape(tokens=sum(q_lens), rows=len(batch), width=width, max_q=max(q_lens), kv_lens=kv_lens)
        return self.host_ints(batch, width, states=states), shape

    def prepare(self, batch: list[Sequence]) -> tuple[torch.Tensor, StepInputs]:
        """The step's tensors (``plan``, then ``inputs``)."""
        return self.inputs(*self.plan(batch))

    def inputs(self, ints: np.ndarray, shape: StepShape) -> tuple[torch.Tensor, StepInputs]:
        """The step's tensors, from one host-to-device copy of every integer it needs (no host sync on CUDA); a
        hybrid model's states placed from the host's copy."""
        if self.states is None:
            return self.step_inputs(to_device(ints, torch.long, self.device), shape)
        b, n = shape.rows, shape.tokens
        counts = ints[2 * n : 2 * n + 2 * b].reshape(2, b)
        tail = STATE_INTS * b
        token_ids, inputs = self.step_inputs(to_device(ints[:-tail], torch.long, self.device), shape)
        inputs.recurrent = recurrent_step(counts[0].tolist(), counts[1].tolist(),
                                          ints[-tail:].reshape(STATE_INTS, b).T.tolist(), self.device)
        return token_ids, inputs

    def step_inputs(self, packed: torch.Tensor, shape: StepShape) -> tuple[torch.Tensor, StepInputs]:
        """Token ids and ``StepInputs`` from the step's integers on the device (``host_ints``' layout). A decode
        step of a paged-decode model gets a ``PagedLayout``, whose shapes depend on ``shape`` alone (a CUDA graph
        can capture it); other steps the padded or varlen layout."""
        device, block_size = self.device, self.block_size
        n, b, width = shape.tokens, shape.rows, shape.width
        token_t, position_t, q_len_t, kv_len_t, alpha_t, table_t = packed.split([n, n, b, b, b, b * width])
        tables = table_t.view(b, width)
        row_of_token = torch.repeat_interleave(torch.arange(b, device=device), q_len_t, output_size=n)
        starts = torch.cumsum(q_len_t, 0) - q_len_t
        write_slots = tables[row_of_token, position_t // block_size] * block_size + position_t % block_size
        layout: PaddedLayout | VarlenLayout | PagedLayout
        if shape.max_q == 1 and self.model.uses_paged_decode:
            layout = PagedLayout(block_tables=tables.int(), kv_lens=kv_len_t.int())
        else:
            assert shape.kv_lens is not None, "the padded and varlen layouts need the key counts on the host"
            slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=device)).view(b, -1)
            if self.model.uses_varlen(shape.max_q):
                layout = varlen_layout(slots, q_len_t, kv_len_t, shape.max_q, shape.kv_lens)
            else:
                layout = padded_layout(slots, q_len_t, kv_len_t, starts, row_of_token, shape.max_q,
                                       max(shape.kv_lens), causal=shape.rows == 1 and shape.tokens == shape.kv_lens[0])

        angles = position_t[:, None].float() * self.inv_freq[alpha_t][row_of_token]
        cos = angles.cos().repeat(1, 2)[:, None, :].to(self.dtype)
        sin = angles.sin()
        sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(self.dtype)
        logn = None
        if self.config.use_logn_attn:
            seq_length = self.config.seq_length
            scale = (position_t + 1).double().log() / math.log(seq_length)
            logn = torch.where(position_t + 1 > seq_length, scale, 1.0).float().to(self.dtype)[:, None, None]
        inputs = StepInputs(cos=cos, sin=sin, logn=logn, write_slots=write_slots, layout=layout,
                            last_index=starts + q_len_t - 1)
        return token_t, inputs


class Command(enum.Enum):
    RUN = "run"
    HIDDEN = "hidden"
    HEAD = "head"
    STOP = "stop"


class Followers(Protocol):
    """The other ranks of a tensor-parallel model, which must run every command rank 0 runs."""

    def send(self, command: Command, ints: np.ndarray | None, shape: StepShape | None, extra: object) -> None: ...


class DecodeStep(Protocol):
    """A faster way to run some decode steps (``DecodeGraphs``)."""

    def fits(self, batch: list[Sequence]) -> bool: ...

    def run(self, batch: list[Sequence]) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepShape:
    """The sizes of a step's integers (``ModelRunner.host_ints``): ``tokens`` new tokens over ``rows`` sequences,
    tables of ``width`` pages, at most ``max_q`` new tokens a sequence; ``kv_lens`` the key counts on the host (the
    padded and varlen layouts are sized by them; None for a paged decode step)."""

    tokens: int
    rows: int
    width: int
    max_q: int
    kv_lens: list[int] | None = None


@dataclass
class DraftRows:
    """Rows of one sequence shaped as the runner reads a sequence, for a pass other than its plain step: positions
    ``num_computed`` to ``step_end`` over ``block_table`` with ``tokens`` (the drafting block's rows: each the token
    after its position), or one token of a sequence verifying drafted tokens, a row of its own (``states``: its
    ``state_ints``, for a hybrid model)."""

    num_computed: int
    step_end: int
    tokens: list[int]
    block_table: list[int]
    ntk_alpha: float = 1.0
    states: tuple[int, ...] | None = None

    def step_tokens(self) -> list[int]:
        return self.tokens


STATE_INTS = 6  # per row of a hybrid model's step: slot, snapshot to restore, position and slot to keep, source, round


def state_ints(row: Sequence | DraftRows) -> tuple[int, ...]:
    """A row's state slot, the snapshot it resumes from, where this step keeps a snapshot (-1: none), and the slot
    its state is read from and its round (a row verifying drafted tokens: see ``recurrent_step``)."""
    if isinstance(row, DraftRows):
        assert row.states is not None, "a hybrid model's step rows carry their states"
        return row.states
    position, slot = row.snapshot or (-1, -1)
    state_slot = row.state_slot if row.state_slot is not None else -1
    return (state_slot, row.restore_slot if row.restore_slot is not None else -1, position, slot, state_slot, 0)


def recurrent_step(q_lens: list[int], kv_lens: list[int], rows: list[list[int]],
                   device: torch.device) -> RecurrentStep:
    """Where each row of a hybrid model's step keeps its states (``rows``: each one's ``state_ints``): rows with
    one new token and no snapshot to keep in their round (0 for a plain decode; a sequence verifying drafted tokens
    has a row per token, the j-th in round j, reading the slot the round before wrote), the others one by one; rows
    at position 0 start from zero states, rows that resume a cached prefix from its snapshot."""
    starts = np.cumsum([0, *q_lens[:-1]]).tolist()
    rounds: list[list[tuple[int, int, int]]] = []
    prompts, fresh, restores = [], [], []
    for start, q_len, kv_len, (slot, restore, position, snapshot, source, round_) in zip(starts, q_lens, kv_lens,
                                                                                         rows, strict=True):
        if q_len == 1 and snapshot < 0:
            rounds += [[] for _ in range(round_ + 1 - len(rounds))]
            rounds[round_].append((start, source, slot))
        else:
            prompts.append((start, q_len, slot, (position - (kv_len - q_len), snapshot) if snapshot >= 0 else None))
        if q_len == kv_len:
            fresh.append(slot)
        elif restore >= 0:
            restores.append((restore, slot))
    indices = [index for each in rounds for row in each for index in row] + fresh  # one copy to the device
    packed = to_device(indices, torch.long, device) if indices else torch.empty(0, dtype=torch.long)
    pieces = packed.split([3 * len(each) for each in rounds] + [len(fresh)])
    decode_rounds = []
    for each, piece in zip(rounds, pieces, strict=False):
        tokens, sources, slots = (column.contiguous() for column in piece.view(-1, 3).t())
        in_place = all(source == target for _, source, target in each)
        decode_rounds.append(DecodeRound(tokens, slots if in_place else sources, slots))
    return RecurrentStep(rounds=decode_rounds, prompts=prompts, fresh_slots=pieces[-1] if fresh else None,
                         restores=restores)


def ntk_alphas(max_model_len: int, seq_length: int) -> list[float]:
    """Every Qwen-1 dynamic-NTK alpha a prompt of up to ``max_model_len`` tokens can get (it changes at
    ``seq_length`` times each power of two)."""
    lengths = [1, max_model_len]
    bound = seq_length
    while bound < max_model_len:
        lengths += [bound, bound + 1]
        bound *= 2
    return sorted({qwen_ntk_alpha(length, seq_length) for length in lengths})


def padded_layout(slots: torch.Tensor, q_lens: torch.Tensor, kv_lens: torch.Tensor, starts: torch.Tensor,
                  row_of_token: torch.Tensor, tq: int, tk: int, *, causal: bool = False) -> PaddedLayout:
    """Left-padded [B, Tq] queries over left-padded [B, Tk] keys, each sequence's queries being its last keys.
    ``slots``: [B, blocks * block_size] cache slot of each position; ``starts``: packed index of each first query;
    ``row_of_token``: [N] the sequence of each packed token; ``causal``: one sequence whose every key is new (a
    prefill without a cached prefix), which needs no mask. Every index is computed on the device, none needs a host
    sync."""
    device = slots.device
    key_offset = torch.arange(tk, device=device)[None, :] - (tk - kv_lens)[:, None]
    query_offset = torch.arange(tq, device=device)[None, :] - (tq - q_lens)[:, None]
    query_valid = query_offset >= 0
    mask = None
    if not causal:
        below = (torch.arange(tk, device=device)[None, :] - tk) <= (torch.arange(tq, device=device)[:, None] - tq)
        mask = ((below[None] & (key_offset >= 0)[:, None, :]) | ~query_valid[:, :, None])[:, None]
    if tq == 1:
        return PaddedLayout(kv_slots=slots.gather(1, key_offset.clamp(min=0)), kv_lens=kv_lens, mask=mask,
                            query_index=None, padded_index=None)
    token = torch.arange(row_of_token.shape[0], device=device)
    padded_index = row_of_token * tq + (tq - q_lens)[row_of_token] + token - starts[row_of_token]
    return PaddedLayout(
        kv_slots=slots.gather(1, key_offset.clamp(min=0)), kv_lens=kv_lens, mask=mask,
        query_index=(starts[:, None] + query_offset).clamp(min=0), padded_index=padded_index,
    )


def varlen_layout(slots: torch.Tensor, q_lens: torch.Tensor, kv_lens: torch.Tensor, tq: int,
                  host_kv_lens: list[int]) -> VarlenLayout:
    """Every sequence's keys packed one after another, with int32 offsets of queries and keys. ``host_kv_lens``:
    the key counts on the host (they fix the packed size, which the device must not be asked for)."""
    device = slots.device
    cu_q = F.pad(torch.cumsum(q_lens, 0), (1, 0))
    cu_k = F.pad(torch.cumsum(kv_lens, 0), (1, 0))
    total = sum(host_kv_lens)
    row_of_key = torch.repeat_interleave(torch.arange(len(host_kv_lens), device=device), kv_lens, output_size=total)
    position_of_key = torch.arange(total, device=device) - cu_k[row_of_key]
    return VarlenLayout(kv_slots=slots[row_of_key, position_of_key], cu_seqlens_q=cu_q.int(),
                        cu_seqlens_k=cu_k.int(), max_q=tq, max_k=max(host_kv_lens))
