"""One decoder-only transformer parameterised by ``ModelConfig`` (Qwen-1, Qwen2, Qwen3, Qwen3-MoE, Llama).

The model runs on *packed* tokens: the new tokens of every sequence in the step, one after another. Only
attention sees the sequences apart, in one of two layouts the runner builds: ``PaddedLayout`` (the portable
path: queries gathered into a left-padded [B, Tq] layout, keys and values from the paged cache into a left-padded
[B, Tk] layout, an explicit mask, torch SDPA), ``VarlenLayout`` (keys packed sequence after sequence with
offsets, for flash-attn's varlen kernel on CUDA) or, for decode steps on CUDA, ``PagedLayout`` (block tables read by
a Triton kernel; fixed shapes, so CUDA graphs can capture the step). Linear layers never pay for padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.kernels import triton_decode, triton_norm, triton_recurrent, triton_rope
from engine.kernels.attention import PagedDecodeAttention
from engine.kernels.flash import VarlenAttention, VarlenKernel
from engine.kernels.triton_decode import TritonPagedAttention
from engine.kernels.triton_rope import TritonRopeStore
from engine.kv_store import LayerCache
from engine.layers import DenseLinear, NativeLinear, RMSNorm, StoredRows, apply_rotary, fuses, project
from engine.linear_attention import GatedDeltaNet, LayerState, RecurrentStep
from engine.parallel import VocabParallel


@dataclass
class PaddedLayout:
    """Attention over keys gathered into a left-padded batch (torch SDPA, and the native decode kernel).

    ``kv_slots``: [B, Tk] left-padded cache slots of every key a sequence attends to; ``kv_lens``: [B] how many of
    them are real; ``mask``: [B, 1, Tq, Tk] True where attention is allowed, or None for one sequence whose keys
    are all new (plain causal attention, no mask built); ``query_index``: [B, Tq] packed index
    of each padded query (None when every sequence has exactly one new token); ``padded_index``: [N] where each
    packed token sits in the flattened [B * Tq] padded queries (None likewise).
    """

    kv_slots: torch.Tensor
    kv_lens: torch.Tensor
    mask: torch.Tensor | None
    query_index: torch.Tensor | None
    padded_index: torch.Tensor | None


@dataclass
class VarlenLayout:
    """Attention over keys packed sequence after sequence (flash-attn's ``flash_attn_varlen_func``).

    ``kv_slots``: [K] cache slot of every key, each sequence's keys in order; ``cu_seqlens_q``/``cu_seqlens_k``:
    [B + 1] int32 offsets of each sequence's queries (the packed new tokens) and keys; ``max_q``/``max_k``: the
    longest of each. A sequence's queries are its last keys (causal masking aligned to the bottom right).
    """

    kv_slots: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_q: int
    max_k: int


@dataclass
class PagedLayout:
    """A decode step (one new token per sequence) read straight from the paged cache: ``block_tables`` [B, W] int32
    pages of each sequence (padded with any page), ``kv_lens`` [B] int32 keys of each, the new one included. Its
    shapes do not depend on the lengths, so the step can be captured in a CUDA graph."""

    block_tables: torch.Tensor
    kv_lens: torch.Tensor


@dataclass
class StepInputs:
    """Everything one forward pass needs besides the token ids (built by the runner).

    ``cos``/``sin``: [N, 1, D/2] rotary factors of every new token; ``logn``: [N, 1, 1] Qwen-1 query scales or
    None; ``write_slots``: [N] cache slot of every new token; ``layout``: how attention sees the sequences;
    ``last_index``: [B] packed index of each sequence's last token (the one whose logits are sampled);
    ``recurrent``: where each row keeps its linear layers' states (hybrid models only).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    logn: torch.Tensor | None
    write_slots: torch.Tensor
    layout: PaddedLayout | VarlenLayout | PagedLayout
    last_index: torch.Tensor
    recurrent: RecurrentStep | None = None


class Attention(nn.Module):
    """Attention over the paged cache. ``decode_attention``: a kernel that reads the paged cache directly, used
    for padded-layout steps where every sequence has one new token (set by the builder where the native kernels
    run); ``varlen_attention``: flash-attn's varlen kernel, for every step of a ``VarlenLayout``; ``paged_attention``:
    a kernel over the block tables of a ``PagedLayout`` (decode steps on CUDA); otherwise gather + masked SDPA.
    ``rope_store``: one kernel for the head norms, RoPE, logN and the cache write (CUDA), else torch ops.
    ``output_gate`` (hybrid Qwen models): q_proj gives each head's queries and then as many gate values; the
    attention output is multiplied by their sigmoid before o_proj."""

    def __init__(self, config: ModelConfig, qkv: nn.Module, o_proj: nn.Module) -> None:
        super().__init__()
        self.decode_attention: PagedDecodeAttention | None = None
        self.q_norm: RMSNorm | None = None  # Qwen3: over each head of q and k, before RoPE
        self.k_norm: RMSNorm | None = None
        self.varlen_attention: VarlenAttention | None = None
        self.paged_attention: TritonPagedAttention | None = None
        self.rope_store: TritonRopeStore | None = None
        self.qkv = qkv
        self.o_proj = o_proj
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.split = (config.q_size, config.kv_size, config.kv_size)
        self.output_gate = config.attn_output_gate

    def forward(self, x: torch.Tensor, step: StepInputs, cache: LayerCache,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """With ``residual``: the output added to it."""
        qkv = self.qkv(x)
        gate = None
        if self.output_gate:
            qkv, gate = self.split_gate(qkv)
        out = self.attend(qkv, step, cache)
        return project(self.o_proj, out if gate is None else out * torch.sigmoid(gate), residual)

    def split_gate(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[queries, keys, values] and the output gate [N, heads * D] of a gated q_proj (each head's queries, then
        its gate values)."""
        n, q_size = qkv.shape[0], self.split[0]
        paired = qkv[:, : 2 * q_size].view(n, self.num_heads, 2, self.head_dim)
        return (torch.cat((paired[:, :, 0].reshape(n, q_size), qkv[:, 2 * q_size :]), dim=-1),
                paired[:, :, 1].reshape(n, q_size))

    def attend(self, qkv: torch.Tensor, step: StepInputs, cache: LayerCache) -> torch.Tensor:
        """The attention output [N, heads * D] of the packed qkv rows (new keys and values written to the cache)."""
        layout = step.layout
        native = self.decode_attention is not None and not cache.fp8  # the native kernel reads int8 or 16-bit rows
        if isinstance(layout, PaddedLayout) and layout.query_index is None and native:
            return self.decode_attention(qkv, step.cos, step.sin, step.logn, step.write_slots, cache,
                                         layout.kv_slots, layout.kv_lens)
        if self.rope_store is not None:
            q = self.rope_store(qkv, step.cos, step.sin, step.logn, step.write_slots, cache, self.q_norm, self.k_norm)
        else:
            q = self.rotate_and_store(qkv, step, cache)
        if isinstance(layout, VarlenLayout):
            assert self.varlen_attention is not None, "the runner builds varlen layouts for varlen models only"
            return self.varlen_attention(q, cache, layout)
        if isinstance(layout, PagedLayout):
            assert self.paged_attention is not None, "the runner builds paged layouts for paged models only"
            return self.paged_attention(q, cache, layout.block_tables, layout.kv_lens)
        return self.padded_attention(q, cache, layout)

    def rotate_and_store(self, qkv: torch.Tensor, step: StepInputs, cache: LayerCache) -> torch.Tensor:
        """Head norms, RoPE and logN with torch ops; keys and values written to the cache. The queries [N, heads, D]."""
        n = qkv.shape[0]
        q_size, kv_size, _ = self.split
        qk = qkv[:, : q_size + kv_size].view(n, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])), dim=1)
        qk = apply_rotary(qk, step.cos, step.sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, q_size + kv_size :]
        if step.logn is not None:
            q = q * step.logn
        cache.write(step.write_slots, k, v.view(n, self.num_kv_heads, self.head_dim))
        return q

    def padded_attention(self, q: torch.Tensor, cache: LayerCache, layout: PaddedLayout) -> torch.Tensor:
        """Masked SDPA over left-padded queries and keys; [N, heads * D] in packed order."""
        n = q.shape[0]
        # index_select copies whole cache rows (several times faster than advanced indexing on CPU)
        padded = (*layout.kv_slots.shape, self.num_kv_heads, self.head_dim)
        keys, values = cache.read(layout.kv_slots.view(-1), q.dtype)
        keys, values = keys.view(padded).transpose(1, 2), values.view(padded).transpose(1, 2)
        if layout.query_index is None and layout.mask is not None and q.device.type == "cpu":
            return decode_attention(q, keys, values, layout.mask).reshape(n, -1)
        queries = q.unsqueeze(2) if layout.query_index is None else q[layout.query_index].transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.mask,
                                             is_causal=layout.mask is None,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2)
        if layout.padded_index is None:
            return out.reshape(n, -1)
        return out.reshape(-1, self.num_heads * self.head_dim).index_select(0, layout.padded_index)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence on CPU: ``q`` [B, heads, D] over left-padded ``keys``/``values`` [B, kv_heads, Tk, D]
    (``mask`` [B, 1, 1, Tk] True where a key is real) as two batched matmuls in fp32, the query heads of a key head
    stacked as rows; [B, heads, D]. torch's CPU SDPA is built for many queries: at one it took 2-7x longer (Qwen3.5
    shapes, 300-2,000 keys)."""
    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.float().view(batch, kv_heads, heads // kv_heads, dim)
    # contiguous fp32 copies: a matmul over the gathered, transposed layout took 3x as long
    keys, values = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (keys, values))
    scores = (grouped @ keys.transpose(-1, -2)) * dim**-0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (weights @ values).view(batch, heads, dim).to(q.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused into one matmul; the activation on one Triton
    kernel when ``triton`` is set (CUDA), or inside the down projection's native kernel after ``fuse_activation``."""

    def __init__(self, gate_up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_up = gate_up
        self.down = down
        self.triton = False

    @property
    def activation_in_down(self) -> bool:
        """Whether the down projection's kernel applies SiLU(gate) * up itself (after ``fuse_activation``)."""
        return isinstance(self.down, NativeLinear) and self.down.matmul.gated

    def fuse_activation(self) -> None:
        """The down projection (a native linear that ``fuses``) applies SiLU(gate) * up to gate_up's output itself."""
        assert isinstance(self.down, NativeLinear) and fuses(self.down)
        self.down.fuse_swiglu()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With ``residual``: the output added to it."""
        if self.activation_in_down:
            return project(self.down, self.gate_up(x), residual)
        if self.triton:
            return project(self.down, triton_norm.silu_and_mul(self.gate_up(x)), residual)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return project(self.down, F.silu(gate) * up, residual)


class SparseMoE(nn.Module):
    """Routed experts (Qwen3-MoE): each token goes to the ``top_k`` experts its router scores highest, weighted
    by their softmax probabilities (renormalized over the chosen ones when ``renormalize``). A ``shared`` expert
    (Qwen3-Next, Qwen3.5-MoE) runs on every token, scaled by the sigmoid of ``shared_gate``.

    Tokens are grouped per expert (one sort), and each expert that got any runs once over its group: the work is
    the chosen experts' and no more. The group sizes are read on the host, so a step with experts cannot be
    captured in a CUDA graph (``DecoderModel.graph_safe``).
    """

    def __init__(self, router: nn.Module, experts: list[MLP], top_k: int, renormalize: bool,
                 shared: MLP | None = None, shared_gate: nn.Module | None = None) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.renormalize = renormalize
        self.shared, self.shared_gate = shared, shared_gate

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With ``residual``: the output added to it."""
        logits = self.router(x)
        probabilities = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype).flatten()
        order = chosen.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                pairs = order[start : start + count]
                tokens = pairs // self.top_k
                out.index_add_(0, tokens, expert(x[tokens]) * weights[pairs, None])
                start += count
        if self.shared is not None and self.shared_gate is not None:
            out += torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out if residual is None else residual + out


class DecoderLayer(nn.Module):
    """A token mixer (attention over the paged cache, or a Gated DeltaNet over its state) and an MLP, each after
    an RMSNorm and added to the residual."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, attention: Attention | GatedDeltaNet,
                 mlp: MLP | SparseMoE) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = attention
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, step: StepInputs, cache: LayerCache | LayerState) -> torch.Tensor:
        """``x`` (the residual stream, a tensor of this step's own) is added to in place where a native kernel
        projects into it."""
        if isinstance(self.attn, GatedDeltaNet):
            assert step.recurrent is not None and isinstance(cache, LayerState), "hybrid steps carry their states"
            x = self.attn(self.attn_norm(x), step.recurrent, cache, residual=x)
        else:
            assert isinstance(cache, LayerCache)
            x = self.attn(self.attn_norm(x), step, cache, residual=x)
        return self.mlp(self.mlp_norm(x), residual=x)


class DraftHead(nn.Module):
    """A multi-token-prediction block (Qwen3-Next, Qwen3.5): at a position, the model's last hidden state after its
    final norm (``target_norm``) and the embedding of the token that follows, each RMS-normalised, are joined by
    ``fc`` (embedding first) into one decoder layer (attention over the block's own keys in the paged cache, and its
    MLP); its output, after ``norm``, drafts the token after that through the model's LM head (``head``: a copy of
    it that applies ``norm`` inside its kernel, where the model's head fuses its own norm; else None)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, fc: nn.Module, layer: DecoderLayer,
                 embed_norm: nn.Parameter, hidden_norm: nn.Parameter, target_norm: nn.Parameter, norm: nn.Parameter,
                 head: nn.Module | None) -> None:
        """``target_norm``: the model's final norm's own weight (shared)."""
        super().__init__()
        self.fc, self.layer, self.head = fc, layer, head
        size, eps = config.hidden_size, config.rms_norm_eps
        self.embed_norm, self.hidden_norm = RMSNorm(size, eps, dtype), RMSNorm(size, eps, dtype)
        self.target_norm, self.norm = RMSNorm(size, eps, norm.dtype), RMSNorm(size, eps, norm.dtype)
        for module, weight in ((self.embed_norm, embed_norm), (self.hidden_norm, hidden_norm),
                               (self.target_norm, target_norm), (self.norm, norm)):
            module.weight = weight


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head. ``forward`` returns fp32 logits of the last tokens.

    The embedding table (tied head) and the LM head may be kept at a higher precision than the layers
    (``head_dtype``): bf16 logits have a resolution of 0.125 around 25, enough to turn near-ties into wrong
    greedy picks.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, embed: torch.Tensor | StoredRows,
                 layers: list[DecoderLayer], lm_head: nn.Module | None) -> None:
        """``embed``: the table, or its rows looked up in a mapped GGUF file (then ``lm_head`` is given)."""
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.head_dtype = embed.dtype
        self.embed = embed if isinstance(embed, StoredRows) else nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = lm_head
        self.vocab_parallel: VocabParallel | None = None  # tensor parallelism: this rank's rows of embed and head
        self.varlen_prompts_only = False
        self.mtp: DraftHead | None = None  # the multi-token-prediction block, when built (speculative decoding)

    @property
    def device(self) -> torch.device:
        """Where the model computes (one used in place from a mapped GGUF file may hold no tensors: the CPU)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    @property
    def attentions(self) -> list[Attention]:
        """The attention modules of the layers that have one (every layer but a hybrid model's linear ones), and the
        multi-token-prediction block's."""
        layers = [*self.layers, *([self.mtp.layer] if self.mtp is not None else [])]
        return [layer.attn for layer in layers if isinstance(layer.attn, Attention)]

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step has no host reads, so a CUDA graph can capture it (routed experts have some, and
        linear layers' states are placed by host-built indices)."""
        return not any(isinstance(layer.mlp, SparseMoE) or isinstance(layer.attn, GatedDeltaNet)
                       for layer in self.layers)

    @property
    def uses_paged_decode(self) -> bool:
        """Whether decode steps read the paged cache through block tables (the runner then builds a ``PagedLayout``
        for them)."""
        return self.attentions[0].paged_attention is not None

    def use_paged_decode(self, make: Callable[[], TritonPagedAttention] | None) -> None:
        """Decode steps on the kernel ``make`` builds (one per layer), or on the step's other layout (None)."""
        for attention in self.attentions:
            attention.paged_attention = None if make is None else make()

    def use_triton_kernels(self, block_size: int) -> None:
        """The CUDA step's Triton kernels: decode attention over the paged cache, one kernel for each layer's head
        norms, RoPE, logN and cache write, RMSNorms, SwiGLU activations and the linear layers' delta rule (each where
        the shapes fit it; none where Triton does not import)."""
        if not triton_decode.available():
            return
        c = self.config
        if triton_decode.fits(c.head_dim, block_size):
            self.use_paged_decode(lambda: TritonPagedAttention(c.num_heads, c.num_kv_heads, c.head_dim, block_size))
        if triton_rope.fits(c.head_dim) and c.rotated_dim == c.head_dim:  # the kernel rotates whole heads
            self.use_rope_store(lambda: TritonRopeStore(c.num_heads, c.num_kv_heads, c.head_dim))
        self.use_triton_elementwise(True)
        if c.hybrid and triton_recurrent.fits(c.linear_key_dim, c.linear_value_dim):
            self.use_triton_recurrence(True)

    def use_triton_elementwise(self, enabled: bool) -> None:
        """RMSNorms and SwiGLU activations on their Triton kernels (CUDA), or torch ops."""
        for module in self.modules():
            if isinstance(module, RMSNorm | MLP):
                module.triton = enabled

    def use_triton_recurrence(self, enabled: bool) -> None:
        """The linear layers' delta rule on its Triton kernel (CUDA), or torch ops."""
        for layer in self.layers:
            if isinstance(layer.attn, GatedDeltaNet):
                layer.attn.triton = enabled

    def use_rope_store(self, make: Callable[[], TritonRopeStore] | None) -> None:
        """Head norms, RoPE, logN and the cache write on the kernel ``make`` builds (one per layer), or torch ops."""
        for attention in self.attentions:
            attention.rope_store = None if make is None else make()

    def uses_varlen(self, max_q: int) -> bool:
        """Whether a step whose sequences have at most ``max_q`` new tokens runs on the varlen kernel (the runner
        then builds a ``VarlenLayout``)."""
        return self.attentions[0].varlen_attention is not None and (max_q > 1 or not self.varlen_prompts_only)

    def use_varlen_attention(self, kernel: VarlenKernel | None, prompts_only: bool = False) -> None:
        """Run attention on ``kernel`` (``flash_attn_varlen_func``'s signature), or on the padded path (None);
        ``prompts_only``: decode-only steps stay on the padded path (and the native decode kernel)."""
        self.varlen_prompts_only = prompts_only
        for attention in self.attentions:
            attention.varlen_attention = None if kernel is None else VarlenAttention(kernel, self.config.head_dim)

    def forward(self, token_ids: torch.Tensor, step: StepInputs, caches: Sequence[LayerCache | LayerState],
                all_logits: bool = False) -> torch.Tensor:
        """``caches``: each layer's keys and values (a linear layer's states). Logits of each sequence's last token,
        or of every token when ``all_logits``."""
        x = self.hidden(token_ids, step, caches)
        return self.head(x if all_logits else x[step.last_index])

    def hidden(self, token_ids: torch.Tensor, step: StepInputs, caches: Sequence[LayerCache | LayerState]
               ) -> torch.Tensor:
        """The last layer's output for every packed token (before the final norm)."""
        x = self.embedding(token_ids)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, step, cache)
        return x

    def embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ``token_ids``, in the layers' dtype."""
        if isinstance(self.embed, StoredRows):
            return self.embed(token_ids).to(self.dtype)
        if self.vocab_parallel is None:
            return F.embedding(token_ids, self.embed).to(self.dtype)
        return self.vocab_parallel.embed(token_ids, self.embed).to(self.dtype)

    def draft(self, token_ids: torch.Tensor, hidden: torch.Tensor, step: StepInputs, cache: LayerCache,
              from_model: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The multi-token-prediction block over packed rows: ``token_ids`` the token after each row's position,
        ``hidden`` the model's last-layer output there (``from_model``; else the block's own normed output at the
        position before, to draft one more). At each sequence's last row: the block's normed output and fp32
        logits."""
        mtp = self.mtp
        assert mtp is not None, "the model was built without its multi-token-prediction block"
        if from_model:
            hidden = mtp.target_norm(hidden.to(self.head_dtype))
        joined = torch.cat((mtp.embed_norm(self.embedding(token_ids)), mtp.hidden_norm(hidden.to(self.dtype))), -1)
        x = mtp.layer(mtp.fc(joined), step, cache)[step.last_index].to(self.head_dtype)
        normed = mtp.norm(x)
        return normed, (mtp.head(x).float() if mtp.head is not None else self.logits(normed))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """fp32 logits of rows after the final norm (a head applying the norm itself takes rows before it)."""
        return (F.linear(normed, self.embed) if self.lm_head is None else self.lm_head(normed)).float()

    def token_logits(self, x: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits of ``token_ids`` only (a reranker's answers): their rows of a dense head, else the whole
        head's columns."""
        rows = self.embed if self.lm_head is None else (
            self.lm_head.weight if isinstance(self.lm_head, DenseLinear) and self.lm_head.bias is None else None)
        if self.vocab_parallel is not None or not isinstance(rows, torch.Tensor):
            return self.head(x)[:, list(token_ids)]
        return F.linear(self.final_norm(x.to(self.head_dtype)), rows[list(token_ids)]).float()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states ``x`` (final norm, then the LM head)."""
        logits = self.logits(self.final_norm(x.to(self.head_dtype)))
        return logits if self.vocab_parallel is None else self.vocab_parallel.gather_logits(logits)
