"""Turns a scheduled batch into model inputs (packed tokens, slots, the attention layout) and runs it."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.layers import inverse_frequencies
from engine.model import DecoderModel, PaddedLayout, StepInputs, VarlenLayout
from engine.sequence import Sequence
from engine.transfer import to_device


class ModelRunner:
    """Owns the model and its KV cache tensor [layers, 2, slots, kv_heads, head_dim]."""

    def __init__(self, model: DecoderModel, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.config = model, config
        self.block_size, self.device, self.dtype = block_size, device, dtype
        if device.type == "cuda":
            # cuDNN's attention builds an execution plan for every new key length: ~10 ms of host time per call,
            # every decode step (torch 2.11 on an H200); the flash / memory-efficient kernels take any length.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.kv_cache = torch.zeros(config.num_layers, 2, num_blocks * block_size, config.num_kv_heads,
                                    config.head_dim, dtype=dtype, device=device)
        self._inv_freq: dict[float, torch.Tensor] = {}

    def inv_freq(self, ntk_alpha: float) -> torch.Tensor:
        if ntk_alpha not in self._inv_freq:
            self._inv_freq[ntk_alpha] = inverse_frequencies(self.config.head_dim, self.config.rope_theta,
                                                            ntk_alpha).to(self.device)
        return self._inv_freq[ntk_alpha]

    @torch.inference_mode()
    def run(self, batch: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Compute every sequence's tokens from ``num_computed`` on; fp32 logits of each last token."""
        token_ids, inputs = self.prepare(batch)
        return self.model(token_ids, inputs, self.kv_cache, all_logits=all_logits)

    @torch.inference_mode()
    def hidden(self, batch: list[Sequence]) -> torch.Tensor:
        """The last layer's output for every new token of ``batch`` (packed); ``model.head`` turns rows into logits."""
        token_ids, inputs = self.prepare(batch)
        return self.model.hidden(token_ids, inputs, self.kv_cache)

    def prepare(self, batch: list[Sequence]) -> tuple[torch.Tensor, StepInputs]:
        """The step's tensors, from one host-to-device copy of every integer it needs (no host sync on CUDA)."""
        device, block_size = self.device, self.block_size
        q_lens = [len(s) - s.num_computed for s in batch]
        kv_lens = [len(s) for s in batch]
        tokens: list[int] = []
        positions: list[int] = []
        for seq, q_len in zip(batch, q_lens, strict=True):
            if q_len == 1:
                tokens.append(seq.token_at(len(seq) - 1))
            else:
                tokens += seq.token_ids[seq.num_computed :]
            positions += range(seq.num_computed, len(seq))
        width = max(len(s.block_table) for s in batch)
        tables: list[int] = []
        for seq in batch:
            tables += seq.block_table + [0] * (width - len(seq.block_table))
        n, b = len(tokens), len(batch)
        packed = to_device([*tokens, *positions, *q_lens, *kv_lens, *tables], torch.long, device)
        token_t, position_t, q_len_t, kv_len_t, table_t = packed.split([n, n, b, b, b * width])

        row_of_token = torch.repeat_interleave(torch.arange(b, device=device), q_len_t, output_size=n)
        slots = (table_t.view(b, width, 1) * block_size + torch.arange(block_size, device=device)).view(b, -1)
        starts = torch.cumsum(q_len_t, 0) - q_len_t
        if self.model.uses_varlen:
            layout: PaddedLayout | VarlenLayout = varlen_layout(slots, q_len_t, kv_len_t, max(q_lens), kv_lens)
        else:
            layout = padded_layout(slots, q_len_t, kv_len_t, starts, max(q_lens), max(kv_lens))

        alphas = [s.ntk_alpha for s in batch]
        if len(set(alphas)) == 1:
            inv = self.inv_freq(alphas[0])[None, :]
        else:
            inv = torch.stack([self.inv_freq(a) for a in alphas])[row_of_token]
        angles = position_t[:, None].float() * inv
        cos = angles.cos().repeat(1, 2)[:, None, :].to(self.dtype)
        sin = angles.sin()
        sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(self.dtype)
        logn = None
        if self.config.use_logn_attn:
            seq_length = self.config.seq_length
            scale = (position_t + 1).double().log() / math.log(seq_length)
            logn = torch.where(position_t + 1 > seq_length, scale, 1.0).float().to(self.dtype)[:, None, None]
        inputs = StepInputs(cos=cos, sin=sin, logn=logn, write_slots=slots[row_of_token, position_t],
                            layout=layout, last_index=starts + q_len_t - 1)
        return token_t, inputs


def padded_layout(slots: torch.Tensor, q_lens: torch.Tensor, kv_lens: torch.Tensor, starts: torch.Tensor,
                  tq: int, tk: int) -> PaddedLayout:
    """Left-padded [B, Tq] queries over left-padded [B, Tk] keys, each sequence's queries being its last keys.
    ``slots``: [B, blocks * block_size] cache slot of each position; ``starts``: packed index of each first query."""
    device = slots.device
    key_offset = torch.arange(tk, device=device)[None, :] - (tk - kv_lens)[:, None]
    query_offset = torch.arange(tq, device=device)[None, :] - (tq - q_lens)[:, None]
    query_valid = query_offset >= 0
    causal = (torch.arange(tk, device=device)[None, :] - tk) <= (torch.arange(tq, device=device)[:, None] - tq)
    mask = (causal[None] & (key_offset >= 0)[:, None, :]) | ~query_valid[:, :, None]
    multi = tq > 1
    return PaddedLayout(
        kv_slots=slots.gather(1, key_offset.clamp(min=0)), kv_lens=kv_lens, mask=mask[:, None],
        query_index=(starts[:, None] + query_offset).clamp(min=0) if multi else None,
        query_valid=query_valid if multi else None,
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
