"""Gated DeltaNet, the linear-attention layer of hybrid Qwen models (Qwen3-Next, Qwen3.5), and its per-sequence state.

A linear layer keeps, for each running sequence, a fixed-size state in a slot of ``StateCache``: the last
``kernel - 1`` inputs of its causal conv and the [value heads, key dim, value dim] matrix of the delta rule. A step's
rows with one new token update their states together (the recurrent form); a row with several (a prompt or a chunk
of one) runs the chunked form from its state, in chunks of ``CHUNK`` tokens. Both are the reference definitions in
plain torch, in fp32; on CPU with the native kernels the decode rows run in one native call instead
(``kernels/recurrent``), on CUDA both forms on Triton kernels (``kernels/triton_recurrent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.kernels import triton_recurrent
from engine.kernels.recurrent import DeltaRuleDecode
from engine.layers import project

CHUNK = 64  # tokens per chunk of the chunked form


Snapshot = tuple[int, int]  # (tokens into the row, slot): keep the row's state after that many of its tokens


@dataclass
class DecodeRound:
    """Rows with one new token each, computed together: ``tokens`` [R] their packed indices, ``sources`` [R] the
    slots their states are read from and ``slots`` [R] the slots the advanced states are written to (the same for a
    plain decode; a row verifying drafted tokens keeps the state after each of them in a slot of its own)."""

    tokens: torch.Tensor
    sources: torch.Tensor
    slots: torch.Tensor

    @property
    def in_place(self) -> bool:
        return self.sources is self.slots


@dataclass
class RecurrentStep:
    """Where a step's rows keep their states: ``rounds`` the rows with one new token (a plain decode, all in round
    0) or a few (a row verifying drafted tokens: its j-th token in round j, each round reading the state the one
    before wrote); ``prompts`` (packed start, token count, slot, snapshot or None) of each other row;
    ``fresh_slots`` the slots of rows that start at position 0 (their state starts at zero; None when there are
    none); ``restores`` (snapshot slot, slot) of rows that resume a cached prefix."""

    rounds: list[DecodeRound]
    prompts: list[tuple[int, int, int, Snapshot | None]]
    fresh_slots: torch.Tensor | None
    restores: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class LayerState:
    """One linear layer's states by slot, fp32: ``conv`` [slots, kernel - 1, conv channels] (the conv's last inputs),
    ``recurrent`` [slots, value heads, key dim, value dim]."""

    conv: torch.Tensor
    recurrent: torch.Tensor

    def reset(self, slots: torch.Tensor) -> None:
        """Zero the states of ``slots`` (sequences that start over)."""
        self.conv.index_fill_(0, slots, 0)
        self.recurrent.index_fill_(0, slots, 0)

    def copy(self, source: int, target: int) -> None:
        """Slot ``target`` takes slot ``source``'s states (a snapshot restored)."""
        self.conv[target] = self.conv[source]
        self.recurrent[target] = self.recurrent[source]


class StateCache:
    """Every linear layer's states for ``slots`` sequences (``layers``: one ``LayerState`` per linear layer)."""

    def __init__(self, config: ModelConfig, slots: int, device: torch.device) -> None:
        self.layers = [LayerState(
            torch.zeros(slots, config.linear_conv_kernel - 1, config.linear_conv_dim, dtype=torch.float32,
                        device=device),
            torch.zeros(slots, config.linear_value_heads, config.linear_key_dim, config.linear_value_dim,
                        dtype=torch.float32, device=device)) for _ in config.linear_layers]


def state_bytes_per_sequence(config: ModelConfig) -> int:
    """Bytes one sequence's states take over all linear layers."""
    conv = (config.linear_conv_kernel - 1) * config.linear_conv_dim * 4
    recurrent = config.linear_value_heads * config.linear_key_dim * config.linear_value_dim * 4
    return len(config.linear_layers) * (conv + recurrent)


class GatedDeltaNet(nn.Module):
    """in_proj (queries, keys, values and the output gate z, one fused matrix) and gate_proj (beta logits b and
    decay inputs a), a depthwise causal conv with SiLU over queries, keys and values, the gated delta rule with
    L2-normalised queries and keys, an RMSNorm of each value head gated by SiLU(z), and out_proj."""

    def __init__(self, config: ModelConfig, in_proj: nn.Module, gate_proj: nn.Module, conv_weight: torch.Tensor,
                 decay_rate: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                 out_proj: nn.Module) -> None:
        """``conv_weight``: [channels, kernel]; ``decay_rate``: A = exp(A_log) per value head."""
        super().__init__()
        self.in_proj, self.gate_proj, self.out_proj = in_proj, gate_proj, out_proj
        self.conv_taps = nn.Parameter(conv_weight.float().t().contiguous(), requires_grad=False)  # [kernel, channels]
        self.decay_rate = nn.Parameter(decay_rate.float(), requires_grad=False)
        self.dt_bias = nn.Parameter(dt_bias, requires_grad=False)
        self.norm_weight = nn.Parameter(norm_weight, requires_grad=False)
        self.eps = config.rms_norm_eps
        self.key_heads, self.value_heads = config.linear_key_heads, config.linear_value_heads
        self.key_dim, self.value_dim = config.linear_key_dim, config.linear_value_dim
        key_size = self.key_heads * self.key_dim
        value_size = self.value_heads * self.value_dim
        self.split = (2 * key_size + value_size, value_size)  # conv inputs, z
        self.qkv_split = (key_size, key_size, value_size)
        self.tiled = config.linear_value_tiled
        self.decode_kernel: DeltaRuleDecode | None = None  # the native recurrent form (CPU), set by the builder
        self.triton = False  # the delta rule on its Triton kernel (CUDA), set by ``DecoderModel.use_triton_kernels``

    def forward(self, x: torch.Tensor, step: RecurrentStep, state: LayerState,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """With ``residual``: the output added to it."""
        for source, target in step.restores:
            state.copy(source, target)
        if step.fresh_slots is not None:
            state.reset(step.fresh_slots)
        projected, gates = self.in_proj(x), self.gate_proj(x)
        if len(step.rounds) == 1 and not step.prompts and self.decode_kernel is None:  # a decode step, in order
            each = step.rounds[0]
            return project(self.out_proj, self.decode_rows(state, each, projected, gates), residual)
        out = torch.empty((x.shape[0], self.value_heads * self.value_dim), dtype=x.dtype, device=x.device)
        for each in step.rounds:
            if self.decode_kernel is not None:
                self.decode_kernel(state, each, projected, gates, out)
            else:
                out[each.tokens] = self.decode_rows(state, each, projected[each.tokens], gates[each.tokens])
        for start, count, slot, snapshot in step.prompts:
            span = slice(start, start + count)
            out[span] = self.prompt_row(state, slot, snapshot, projected[span], gates[span])
        return project(self.out_proj, out, residual)

    def decode_rows(self, state: LayerState, rows: DecodeRound, projected: torch.Tensor,
                    gates: torch.Tensor) -> torch.Tensor:
        """A round of rows with one new token each (``projected``/``gates``: theirs; torch's ops, which
        ``DeltaRuleDecode`` computes in one native call): the conv over each row's stored window and its input,
        then the recurrent form and the gated norm; [R, value size] in the model's dtype."""
        mixed, z = projected.split(self.split, dim=-1)
        decay, beta = self.gate_values(gates)
        window = torch.cat((state.conv[rows.sources], mixed[:, None].to(state.conv.dtype)), dim=1)
        state.conv.index_copy_(0, rows.slots, window[:, 1:])
        q, k, v = self.heads(F.silu((window * self.conv_taps).sum(1)))
        if self.triton:  # the kernel advances states in place: a verifying row's copied to its round's slot first
            if not rows.in_place:
                state.recurrent.index_copy_(0, rows.slots, state.recurrent[rows.sources])
            return self.gated_norm(triton_recurrent.decode(state.recurrent, rows.slots, q, k, v, decay, beta), z)
        states = state.recurrent[rows.sources]
        out = recurrent_update(states, q, k, v, decay, beta)
        state.recurrent.index_copy_(0, rows.slots, states)
        return self.gated_norm(out, z)

    def prompt_row(self, state: LayerState, slot: int, snapshot: Snapshot | None, projected: torch.Tensor,
                   gates: torch.Tensor) -> torch.Tensor:
        """One row with several new tokens: the conv over its stored window and inputs, then the chunked form from
        its state and the gated norm; with a ``snapshot``, both states are kept where it says. [T, value size] in
        the model's dtype."""
        mixed, z = projected.split(self.split, dim=-1)
        decay, beta = self.gate_values(gates)
        count, kernel = mixed.shape[0], self.conv_taps.shape[0]
        window = torch.cat((state.conv[slot], mixed.to(state.conv.dtype)))
        if snapshot is not None:  # the kernel - 1 inputs before that position
            state.conv[snapshot[1]] = window[snapshot[0] : snapshot[0] + kernel - 1]
        state.conv[slot] = window[count:]
        q, k, v = self.heads(F.silu((window.unfold(0, kernel, 1) * self.conv_taps.t()).sum(-1)))
        if self.triton and count < CHUNK:  # token by token on the kernel, the snapshot kept on the way
            return self.gated_norm(triton_recurrent.prompt(state.recurrent, slot, snapshot, q, k, v, decay, beta), z)
        offset, kept = snapshot if snapshot is not None else (count, -1)
        out = torch.empty_like(v)
        for span in (slice(0, offset), slice(offset, count)):
            if span.stop > span.start:
                out[span] = self.delta_rule(state.recurrent, slot, q[span], k[span], v[span], decay[span],
                                            beta[span])
            if kept >= 0 and span.stop == offset:
                state.recurrent[kept] = state.recurrent[slot]
        return self.gated_norm(out, z)

    def delta_rule(self, states: torch.Tensor, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   decay: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """T tokens of one row ([T, H, *]) from the state in ``slot`` of ``states`` (advanced in place): the chunked
        form (on the Triton kernels: its terms in torch, the chunks' scan on the kernel; under a chunk, the
        recurrent kernel token by token). [T, H, V]."""
        if not self.triton:
            return chunked_delta_rule(states[slot], q, k, v, decay, beta)
        if q.shape[0] < CHUNK:
            return triton_recurrent.prompt(states, slot, None, q, k, v, decay, beta)
        return triton_recurrent.scan(states, slot, chunk_terms(q, k, v, decay, beta))[:, : q.shape[0]].transpose(0, 1)

    def gate_values(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log of each row's state decay and its beta [R, value heads], fp32, from gate_proj's output."""
        b, a = gates.split(self.value_heads, dim=-1)
        return -self.decay_rate * F.softplus(a.float() + self.dt_bias.float()), b.float().sigmoid()

    def heads(self, convolved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (L2-normalised and scaled), keys (L2-normalised) and values per value head, fp32, from the
        conv's output [N, channels] (each key head serves value_heads / key_heads value heads: grouped, or tiled
        in llama.cpp's Qwen3.5 files)."""
        n = convolved.shape[0]
        q, k, v = convolved.float().split(self.qkv_split, dim=-1)
        q = l2norm(q.reshape(n, self.key_heads, self.key_dim))
        k = l2norm(k.reshape(n, self.key_heads, self.key_dim))
        repeat = self.value_heads // self.key_heads
        if repeat > 1 and self.tiled:
            q, k = q.repeat(1, repeat, 1), k.repeat(1, repeat, 1)
        elif repeat > 1:
            q, k = q.repeat_interleave(repeat, dim=1), k.repeat_interleave(repeat, dim=1)
        return q * self.key_dim**-0.5, k, v.reshape(n, self.value_heads, self.value_dim)

    def gated_norm(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``core`` [R, value heads, V] (fp32) in the model's dtype (``z``'s), then RMSNorm over each value head (in
        fp32, weighted in the model dtype), times SiLU(z); [R, value size]."""
        rows, dtype = core.shape[0], z.dtype
        normed = F.rms_norm(core.to(dtype).float(), (self.value_dim,), eps=self.eps).to(dtype) * self.norm_weight
        return (normed * F.silu(z.float().view(rows, self.value_heads, self.value_dim))).to(dtype).reshape(rows, -1)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last axis (the reference's normalisation of queries and keys)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def recurrent_update(states: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                     beta: torch.Tensor) -> torch.Tensor:
    """One token of each row: ``states`` [R, H, K, V] decayed, corrected toward v along k, updated in place; the
    output [R, H, V] is the new state read along q. ``decay``/``beta``: [R, H]."""
    states.mul_(decay.exp()[..., None, None])
    remembered = (states * k[..., None]).sum(dim=-2)
    delta = (v - remembered) * beta[..., None]
    states.add_(k[..., None] * delta[..., None, :])
    return (states * q[..., None]).sum(dim=-2)


@dataclass
class ChunkTerms:
    """The chunked form's per-chunk terms of one sequence's T tokens, for ``H`` heads and ``N`` chunks of ``CHUNK``
    (the last padded with tokens that neither decay nor update the state): ``values`` [H, N, C, V] and ``key_decay``
    [H, N, C, K] the corrections' WY factors (solved within each chunk); ``within`` [H, N, C, C] the causal,
    decayed query-key products inside a chunk; ``q_decayed`` [H, N, C, K] and ``k_to_end`` [H, N, C, K] the queries
    and keys decayed from the chunk's start and to its end; ``chunk_decay`` [H, N] a chunk's total decay. Given
    them, the chunks carry the state one after another (``scan_chunks``)."""

    values: torch.Tensor
    key_decay: torch.Tensor
    within: torch.Tensor
    q_decayed: torch.Tensor
    k_to_end: torch.Tensor
    chunk_decay: torch.Tensor


def chunk_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                beta: torch.Tensor) -> ChunkTerms:
    """``ChunkTerms`` of T tokens ([T, H, *]): within each chunk the corrections are one unit-triangular system (the
    WY form), solved for all chunks at once."""
    t = q.shape[0]
    pad = -t % CHUNK
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (q, k, v))  # [H, T', *]
    beta, decay = (F.pad(x.transpose(0, 1), (0, pad)) for x in (beta, decay))  # [H, T']
    heads = q.shape[0]
    q, k, v = (x.reshape(heads, -1, CHUNK, x.shape[-1]) for x in (q, k, v))
    beta, decay = beta.reshape(heads, -1, CHUNK), decay.reshape(heads, -1, CHUNK)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    cumulative = decay.cumsum(dim=-1)
    pairwise = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    return ChunkTerms(
        values=torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True),
        key_decay=torch.linalg.solve_triangular(system, k_beta * cumulative.exp()[..., None], upper=False,
                                                unitriangular=True),
        within=(q @ k.transpose(-1, -2)) * pairwise,
        q_decayed=q * cumulative.exp()[..., None],
        k_to_end=k * (cumulative[..., -1:] - cumulative).exp()[..., None],
        chunk_decay=cumulative[..., -1].exp())


def scan_chunks(state: torch.Tensor, terms: ChunkTerms) -> torch.Tensor:
    """The chunks one after another from ``state`` [H, K, V] (advanced in place): each chunk's corrections against
    the state it starts from, its outputs, and the state it leaves. [H, N * CHUNK, V] (padding included)."""
    out = torch.empty_like(terms.values)
    current = state.clone()
    for i in range(terms.values.shape[1]):
        corrected = terms.values[:, i] - terms.key_decay[:, i] @ current
        out[:, i] = terms.q_decayed[:, i] @ current + terms.within[:, i] @ corrected
        current = current * terms.chunk_decay[:, i, None, None] + terms.k_to_end[:, i].transpose(-1, -2) @ corrected
    state.copy_(current)
    return out.reshape(out.shape[0], -1, out.shape[-1])


def chunked_delta_rule(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                       beta: torch.Tensor) -> torch.Tensor:
    """The same rule over T tokens of one sequence ([T, H, *]), ``CHUNK`` tokens at a time (``chunk_terms``, then
    ``scan_chunks``). ``state`` [H, K, V] is advanced in place; returns [T, H, V]."""
    return scan_chunks(state, chunk_terms(q, k, v, decay, beta))[:, : q.shape[0]].transpose(0, 1)
