"""What a dry CUDA step runs on instead of the card: the CUDA-only kernels as stand-ins that assert their calling
contract and return a tensor of the right shape, CUDA graph capture, pinned memory and the step's read-back as
recorders, and ``TransferWatch``, which fails the step at any copy between host and card other than the step's
pinned, non-blocking uploads (a ``.cpu()``, ``.tolist()`` or ``.numpy()`` waits for the card; a pageable upload
does too; an upload inside a captured graph would replay stale host memory)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.dry_run import STAND_IN

PINNED = "pinned_stand_in"  # the attribute ``pin_memory``'s stand-in sets on the host tensors it returns


class HostTransferError(AssertionError):
    """A copy between host and card that the step must not make."""


def on_stand_in(*tensors: torch.Tensor) -> None:
    assert all(t.device == STAND_IN for t in tensors), [t.device for t in tensors]


def pin_memory(self: torch.Tensor) -> torch.Tensor:
    """``Tensor.pin_memory`` without a CUDA runtime: a copy marked as pinned."""
    out = self.clone()
    setattr(out, PINNED, True)
    return out


class TransferWatch(FakeTensorMode):
    """The dry run's fake tensor mode (``simulated_cuda(mode=...)``), watching every op while ``watching``: an
    upload must come from pinned memory, non-blocking, and not while a graph is captured; any download (or read of a
    device scalar) raises. Counts the uploads. (A mode of its own above the fake one would not be consulted inside
    the engine's ``torch.inference_mode``.)"""

    DOWNLOADS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"})

    def __init__(self) -> None:
        super().__init__()
        self.uploads = 0
        self.armed = self.capturing = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed:
            self._check(str(func), args, kwargs or {})
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _check(self, name: str, args, kwargs) -> None:
        if name in self.DOWNLOADS:
            raise HostTransferError(f"{name} reads a value on the card: a host sync")
        if name == "aten._to_copy.default":
            self._copy(name, args[0], kwargs.get("device", args[0].device), kwargs.get("non_blocking", False))
        elif name == "aten.copy_.default":
            self._copy(name, args[1], args[0].device, kwargs.get("non_blocking", args[2] if len(args) > 2 else False))

    def _copy(self, name: str, source: torch.Tensor, target: torch.device, non_blocking: bool) -> None:
        if source.device == STAND_IN and target.type == "cpu":
            raise HostTransferError(f"{name} copies from the card to the host: a host sync")
        if source.device.type == "cpu" and target == STAND_IN:
            if self.capturing:
                raise HostTransferError(f"{name} uploads inside a captured graph (a replay reads stale memory)")
            if not getattr(source, PINNED, False) or not non_blocking:
                raise HostTransferError(f"{name} uploads from pageable memory or blocking: the host waits")
            self.uploads += 1

    def watching(self) -> AbstractContextManager[None]:
        """Within: the checks apply (building the engine uploads its tables unpinned, as loading may)."""
        return switched_on(self, "armed")

    def capture(self) -> AbstractContextManager[None]:
        """Within: a graph is being captured."""
        return switched_on(self, "capturing")


@contextmanager
def switched_on(owner: object, flag: str) -> Iterator[None]:
    setattr(owner, flag, True)
    try:
        yield
    finally:
        setattr(owner, flag, False)


class RecordedCapture:
    """``cuda_graphs.GraphCapture`` without a card: runs the step once while ``watch`` refuses uploads; a replay is
    counted (the recorded work is the step that ran)."""

    def __init__(self, watch: TransferWatch) -> None:
        self.watch = watch
        self.captures = self.replays = 0

    def __call__(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        with self.watch.capture():
            output = forward()
        self.captures += 1
        return self._replay, output

    def _replay(self) -> None:
        self.replays += 1


class ReadBack:
    """The step's one read of device results (``transfer.to_host``): checks it is handed the sampled tokens
    (int64, one per row) and row-aligned results on the card, and reads ``token`` for every row, zeros for the
    rest."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.calls = 0

    def __call__(self, tokens: torch.Tensor, *rest: torch.Tensor) -> list[np.ndarray]:
        on_stand_in(tokens, *rest)
        assert tokens.dtype == torch.int64 and tokens.dim() == 1
        assert all(t.shape[0] == tokens.shape[0] for t in rest)
        self.calls += 1
        return [np.full(tokens.shape, self.token, dtype=np.int64),
                *(np.zeros(t.shape, dtype=np.float32 if t.is_floating_point() else np.int64) for t in rest)]


class ElementwiseContract:
    """The Triton RMSNorm's and SwiGLU activation's contract: rows with unit stride in the last axis on the card (and
    a weight of that width for the norm)."""

    def __init__(self) -> None:
        self.norms = self.activations = 0

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        on_stand_in(x, weight)
        assert x.stride(-1) == 1 and weight.shape == (x.shape[-1],) and eps > 0
        self.norms += 1
        return torch.empty_like(x)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        on_stand_in(gate_up)
        assert gate_up.stride(-1) == 1 and gate_up.shape[-1] % 2 == 0
        self.activations += 1
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


class RecurrenceContract:
    """The Triton delta rule's contract (``triton_recurrent.delta_rule``): the states [slots, heads, key dim, value
    dim] in fp32, the per-row numbers as int32 vectors of one length, the packed queries, keys, values and gates of
    matching shapes, all on the card."""

    def __init__(self) -> None:
        self.rows = self.calls = 0

    def delta_rule(self, states: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                   q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor,
                   kept_after: torch.Tensor, kept_slots: torch.Tensor) -> torch.Tensor:
        rows = (slots, starts, counts, kept_after, kept_slots)
        on_stand_in(states, q, k, v, decay, beta, *rows)
        _, heads, key_dim, value_dim = states.shape
        assert states.dtype == torch.float32 and states.is_contiguous()
        assert all(x.dtype == torch.int32 and x.shape == slots.shape for x in rows)
        tokens = q.shape[0]
        assert q.shape == k.shape == (tokens, heads, key_dim) and v.shape == (tokens, heads, value_dim)
        assert decay.shape == beta.shape == (tokens, heads)
        self.calls += 1
        self.rows += slots.shape[0]
        return v.new_empty(v.shape, dtype=torch.float32)


class ChunkScanContract:
    """The Triton chunk scan's contract (``triton_recurrent.scan``): the states [slots, H, K, V] in fp32, one slot,
    and the chunked form's terms of matching shapes (``ChunkTerms``: [H, N, C, *], chunk decays [H, N]), all on the
    card."""

    def __init__(self) -> None:
        self.calls = self.chunks = 0

    def scan(self, states: torch.Tensor, slot: int, terms) -> torch.Tensor:
        on_stand_in(states, terms.values, terms.key_decay, terms.within, terms.q_decayed, terms.k_to_end,
                    terms.chunk_decay)
        _, heads, key_dim, value_dim = states.shape
        assert states.dtype == torch.float32 and states.is_contiguous() and 0 <= slot < states.shape[0]
        _, chunks, chunk, _ = terms.values.shape
        assert terms.values.shape == (heads, chunks, chunk, value_dim)
        assert terms.key_decay.shape == terms.q_decayed.shape == terms.k_to_end.shape == (heads, chunks, chunk, key_dim)
        assert terms.within.shape == (heads, chunks, chunk, chunk) and terms.chunk_decay.shape == (heads, chunks)
        self.calls += 1
        self.chunks += chunks
        return terms.values.new_empty((heads, chunks * chunk, value_dim))


class MatcherStandIn:
    """A grammar's matcher: fills a host bitmask (pinned, as the sampler must hand it to the card) allowing all."""

    def __init__(self) -> None:
        self.fills = 0

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        assert bitmask.device.type == "cpu" and bitmask.dtype == torch.int32 and getattr(bitmask, PINNED, False)
        self.fills += 1

    def accept_token(self, token_id: int) -> bool:
        return True


class GrammarStandIn:
    """``SamplingParams.grammar`` whose matcher is ``MatcherStandIn``."""

    def __init__(self) -> None:
        self.matchers: list[MatcherStandIn] = []

    def matcher(self, stop_ids) -> MatcherStandIn:
        self.matchers.append(MatcherStandIn())
        return self.matchers[-1]


def cache_in(cache, dtype: torch.dtype) -> None:
    """Keys and values alike: in ``dtype``, or 8-bit (int8/fp8) with fp32 scales per slot and head on the card."""
    if cache.quantized:
        assert cache.k.dtype == cache.v.dtype and cache.k.dtype in (torch.int8, torch.float8_e4m3fn)
        assert cache.k_scale.dtype == cache.v_scale.dtype == torch.float32
        assert cache.k_scale.shape == cache.k.shape[:2]
        on_stand_in(cache.k_scale, cache.v_scale)
    else:
        assert cache.k.dtype == cache.v.dtype == dtype


class PagedDecodeContract:
    """The Triton paged-decode kernel's contract: [B, heads, D] queries in the cache's dtype (or an int8/fp8 cache
    with fp32 scales per slot and head), caches with unit stride in D, int32 block tables and key counts of B rows, all
    on the card."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.calls = 0

    def __call__(self, q, cache, block_tables, kv_lens) -> torch.Tensor:
        on_stand_in(q, cache.k, cache.v, block_tables, kv_lens)
        batch = q.shape[0]
        assert q.shape == (batch, self.heads, self.head_dim)
        cache_in(cache, q.dtype)
        assert cache.k.shape[1:] == (self.kv_heads, self.head_dim) and cache.k.stride(-1) == 1
        assert block_tables.dtype == kv_lens.dtype == torch.int32 and block_tables.is_contiguous()
        assert block_tables.shape[0] == kv_lens.shape[0] == batch and block_tables.dim() == 2
        self.calls += 1
        return q.new_empty((batch, self.heads * self.head_dim))


class RopeStoreContract:
    """The fused RoPE/cache-write kernel's contract: [N, (heads + 2 kv_heads) * D] q/k/v with unit feature stride,
    rotary factors [N, 1, D] and logN [N, 1, 1] in its dtype, int64 slots of N tokens, a cache in that dtype with keys
    and values laid out alike (or 8-bit with fp32 scales per slot and head), all on the card; it returns the
    queries [N, heads, D]."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.calls = 0

    def __call__(self, qkv, cos, sin, logn, slots, cache, q_norm, k_norm) -> torch.Tensor:
        tokens = qkv.shape[0]
        on_stand_in(qkv, cos, sin, slots, cache.k, cache.v, *([] if logn is None else [logn]))
        assert qkv.shape == (tokens, (self.heads + 2 * self.kv_heads) * self.head_dim) and qkv.stride(1) == 1
        assert cos.shape == sin.shape == (tokens, 1, self.head_dim) and cos.dtype == sin.dtype == qkv.dtype
        assert logn is None or (logn.shape == (tokens, 1, 1) and logn.dtype == qkv.dtype)
        assert slots.dtype == torch.int64 and slots.shape == (tokens,)
        cache_in(cache, qkv.dtype)
        assert not cache.quantized or cache.k_scale.stride() == cache.v_scale.stride()
        assert cache.k.stride() == cache.v.stride() and cache.k.stride(-1) == 1
        assert (q_norm is None) == (k_norm is None)
        self.calls += 1
        return qkv.new_empty((tokens, self.heads, self.head_dim))


class VarlenContract:
    """flash-attn's ``flash_attn_varlen_func`` contract: fp16/bf16 q, k, v alike, contiguous, [tokens, heads, D];
    int32 offsets; on the card."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale,
                 causal) -> torch.Tensor:
        on_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k)
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        assert q.is_contiguous() and k.dim() == v.dim() == q.dim() == 3
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and causal
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        self.calls += 1
        return torch.empty_like(q)
