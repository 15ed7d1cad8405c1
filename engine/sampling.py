"""Sampling parameters and the per-row vectorised sampler."""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from engine.transfer import host_buffer, to_device, to_host

if TYPE_CHECKING:
    from engine.grammar import Grammar

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (1/T would overflow fp32 logits)
SEED_RANGE = 1 << 64  # seeds are unsigned 64-bit integers


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Defaults are neutral: plain sampling, no truncation, no penalties.

    ``temperature`` below ``GREEDY_BELOW`` is greedy; ``top_k`` <= 0 and ``top_p`` = 1 and ``min_p`` = 0 disable
    truncation; ``repetition_penalty`` follows HF (prompt and output tokens); presence/frequency penalties follow OpenAI
    (output tokens); ``logit_bias`` adds to raw logits (-100 effectively bans a token); ``logprobs=k`` returns the
    chosen token's log-probability and the top-k alternatives from the model's raw distribution; ``grammar``
    (``engine.grammar``) allows only tokens that keep the output inside it, and ends it once complete.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise ValueError("temperature must be a finite number >= 0")
        if self.seed is not None and not 0 <= self.seed < SEED_RANGE:
            raise ValueError("seed must be in [0, 2**64)")
        if not all(math.isfinite(v) for v in (self.presence_penalty, self.frequency_penalty,
                                               *self.logit_bias.values())):
            raise ValueError("penalties and logit_bias values must be finite")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError("repetition_penalty must be a finite number > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise ``ValueError`` for a token id or ``top_k`` the vocabulary cannot hold."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size {vocab_size} (or -1/0 for all)")
        ids = (*self.logit_bias, *self.stop_token_ids)
        if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
            raise ValueError(f"token ids in logit_bias and stop_token_ids must be in [0, {vocab_size})")

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


class TokenMatcher(Protocol):
    """One sequence's parse under a grammar (an ``xgrammar.GrammarMatcher``)."""

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> object: ...

    def accept_token(self, token_id: int) -> bool: ...


class PenaltyState:
    """One row's penalty and bias inputs as tensors on the logits' device, kept up to date token by token, so a step
    costs the same whatever the length of the prompt, the output or the ``logit_bias`` map."""

    def __init__(self, params: SamplingParams, prompt_ids: Seq[int], output_ids: Seq[int], stop_ids: frozenset[int],
                 width: int, device: torch.device) -> None:
        self.bias_ids = self.bias_values = None
        if params.logit_bias:
            self.bias_ids = to_device(list(params.logit_bias), torch.long, device)
            self.bias_values = to_device(list(params.logit_bias.values()), torch.float32, device)
        self.stop_ids = to_device(sorted(stop_ids), torch.long, device) if params.min_tokens and stop_ids else None
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(width, dtype=torch.bool, device=device)
            self.seen[to_device(list(prompt_ids), torch.long, device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(width, dtype=torch.float32, device=device)
        for token in output_ids:
            self.record(token)

    def record(self, token: int) -> None:
        """Count one generated token."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


@dataclass
class SampleRequest:
    """What the sampler needs to know about one row (``state``: its kept penalty tensors; built from the ids when
    None)."""

    params: SamplingParams
    prompt_ids: Seq[int]
    output_ids: Seq[int]
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    matcher: TokenMatcher | None = None
    state: PenaltyState | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def apply_penalties_and_bias(logits: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
    """Logit bias, min_tokens bans, HF repetition penalty and OpenAI presence/frequency penalties, in place. The
    penalties run once for all the rows that use them (their states stacked), not row by row."""
    states = [r.state if r.state is not None else
              PenaltyState(r.params, r.prompt_ids, r.output_ids, r.stop_ids, logits.shape[-1],
                           logits.device) for r in rows]
    for row, (request, state) in enumerate(zip(rows, states, strict=True)):
        if state.bias_ids is not None:
            logits[row, state.bias_ids] += state.bias_values.to(logits.dtype)
        if len(request.output_ids) < request.params.min_tokens and state.stop_ids is not None:
            logits[row, state.stop_ids] = float("-inf")
    repeated = [row for row, state in enumerate(states) if state.seen is not None]
    if repeated:
        index = to_device(repeated, torch.long, logits.device)
        penalty = to_device([rows[r].params.repetition_penalty for r in repeated], logits.dtype, logits.device)
        scores = logits[index]
        penalised = torch.where(scores < 0, scores * penalty[:, None], scores / penalty[:, None])
        logits[index] = torch.where(torch.stack([states[r].seen for r in repeated]), penalised, scores)
    counted = [row for row, state in enumerate(states) if state.counts is not None]
    if counted:
        index = to_device(counted, torch.long, logits.device)
        weights = to_device([getattr(rows[r].params, name) for name in ("presence_penalty", "frequency_penalty")
                             for r in counted], torch.float32, logits.device).view(2, -1, 1)
        counts = torch.stack([states[r].counts for r in counted])
        logits[index] -= (weights[0] * (counts > 0) + weights[1] * counts).to(logits.dtype)
    return logits


def mask_logits(logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
    """Set to -inf, in place, every token the matcher of a constrained row does not allow next."""
    constrained = [(row, r.matcher) for row, r in enumerate(rows) if r.matcher is not None]
    if not constrained:
        return
    vocab, device = logits.shape[-1], logits.device
    bitmask = host_buffer((len(constrained), (vocab + 31) // 32), torch.int32, device)
    for index, (_, matcher) in enumerate(constrained):
        matcher.fill_next_token_bitmask(bitmask, index)
    bits = bitmask.to(device, non_blocking=True)
    allowed = ((bits[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1).bool()
    index = to_device([row for row, _ in constrained], torch.long, device)
    logits[index] = logits[index].masked_fill(~allowed.view(len(constrained), -1)[:, :vocab], float("-inf"))


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then min-p, per row on temperature-scaled logits: dropped tokens get -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0].fill_(False)  # the best token always stays (a fill, not a copy from a host scalar)
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


class Sampler:
    """Picks the next token of every row in one pass; ``vocab_limit`` hides embedding rows no tokenizer has.
    ``read_back`` is the step's one read of device results (``transfer.to_host``; a dry run stands it in)."""

    def __init__(self, vocab_limit: int | None = None) -> None:
        self.vocab_limit = vocab_limit
        self.read_back: Callable[..., list[np.ndarray]] = to_host

    def __call__(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> SampleResult:
        logits = logits.float()
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        wanted = [r.params.logprobs for r in rows]
        raw_logprobs = logits.log_softmax(dim=-1) if any(k is not None for k in wanted) else None
        logits = apply_penalties_and_bias(logits, rows)
        mask_logits(logits, rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled) == len(rows):
            chosen = self._sample(logits, rows)
        else:
            chosen = logits.argmax(dim=-1)
            if sampled:
                index = to_device(sampled, torch.long, logits.device)
                chosen[index] = self._sample(logits[index], [rows[i] for i in sampled])
        if raw_logprobs is None:
            (token_ids,) = self.read_back(chosen)
            return SampleResult(token_ids.tolist(), [None] * len(rows))
        top = max(k for k in wanted if k is not None)
        top_values, top_ids = raw_logprobs.topk(top, dim=-1)
        host = self.read_back(chosen, raw_logprobs.gather(1, chosen[:, None])[:, 0], top_ids, top_values)
        token_ids, chosen_values, top_ids, top_values = (array.tolist() for array in host)
        logprobs: list[dict[int, float] | None] = []
        for row, k in enumerate(wanted):
            entry = None if k is None else {token_ids[row]: chosen_values[row]}
            if k:
                entry.update(zip(top_ids[row][:k], top_values[row][:k], strict=True))
            logprobs.append(entry)
        return SampleResult(token_ids, logprobs)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
        """One host-to-device copy of the rows' temperature, top-k, top-p and min-p (top-k exact as a float)."""
        fields = ("temperature", "top_k", "top_p", "min_p")
        values = [getattr(r.params, name) for name in fields for r in rows]
        temperature, top_k, top_p, min_p = to_device(values, torch.float32, logits.device).view(4, -1)
        logits = logits / temperature.to(logits.dtype)[:, None]
        if any(r.params.truncates for r in rows):
            logits = truncate(logits, top_k.long(), top_p.to(logits.dtype), min_p.to(logits.dtype))
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p. Unseeded rows share one draw; each seeded
        # row draws its own noise from its generator.
        noise = torch.empty_like(probs).exponential_()
        for row, request in enumerate(rows):
            if request.generator is not None:
                noise[row].exponential_(generator=request.generator)
        return (probs / noise).argmax(dim=-1)
