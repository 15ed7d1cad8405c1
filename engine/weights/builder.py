"""Build a ``DecoderModel`` from a weight source, one tensor at a time, straight into the target dtype/device."""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch import nn

from engine.config import ModelConfig
from engine.device import head_dtype
from engine.kernels import attention as attention_kernel
from engine.kernels import flash, gguf_matmul, native, q4q8, q8head, triton_int4
from engine.kernels import recurrent as recurrent_kernel
from engine.kernels.sequential_attention import sequential_varlen
from engine.layers import (
    CudaInt4Linear,
    DenseLinear,
    Int4Linear,
    NativeLinear,
    Q4Q8Linear,
    Q8Linear,
    ReorderedInputs,
    RMSNorm,
    StoredLinear,
    StoredRows,
    TritonInt4Linear,
    fuses,
)
from engine.linear_attention import GatedDeltaNet
from engine.model import MLP, Attention, DecoderLayer, DecoderModel, DraftHead, SparseMoE
from engine.parallel import RowParallel, Shard, VocabParallel
from engine.weights.int4 import CUDA_INT4, TRITON_INT4, Int4Weight
from engine.weights.sources import WeightSource, drafting_layer_names

log = logging.getLogger(__name__)


class ModelBuilder:
    """Turns canonical parts (``names``) of a checkpoint into modules.

    ``int4_kernel``: keep 4-bit matrices packed, on torch's weight-only int4 CPU kernel (``"torch"``), its CUDA kernel
    (``"tinygemm"``: bf16, where the shapes fit; the rest dequantized), the Triton kernel (``"triton"``: bf16/fp16,
    GPTQ's packing; CUDA, or CPU tensors under the Triton interpreter) or on the
    native kernels built for that instruction set (``"avx512"``, ``"avx2"``: int4 x int8 linears with their RMSNorm
    fused in, the Q8_0 head as stored, decode attention read from the paged cache; each where the shapes fit); None
    dequantizes them. On CUDA in fp16/bf16,
    attention runs on flash-attn's varlen kernel when the package is installed.
    ``rope_permuted``: the checkpoint stores q/k rows in llama.cpp's interleaved order (GGUF llama).
    ``unit_offset_norms``: the checkpoint stores RMSNorm scales as offsets from 1 (hybrid Qwen models' folders).
    ``shard``: build only this rank's slice of every split weight (``engine.parallel``; 4-bit weights are then
    dequantized as they load), with the collectives over ``group``.
    """

    def __init__(self, config: ModelConfig, source: WeightSource, names: dict[str, str], dtype: torch.dtype,
                 device: torch.device, *, int4_kernel: str | None = None, rope_permuted: bool = False,
                 unit_offset_norms: bool = False, shard: Shard | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        if shard is not None:
            shard.check(config)
            int4_kernel = None
        self.full = config  # the whole model's shapes; ``config``: this rank's
        self.config = shard.local_config(config) if shard is not None else config
        self.shard, self.group = shard, group
        self.source, self.names = source, names
        self.dtype, self.device = dtype, device
        self.head_dtype = head_dtype(dtype, device)
        self.int4_kernel, self.rope_permuted = int4_kernel, rope_permuted
        self.unit_offset_norms = unit_offset_norms
        self.isa = int4_kernel if int4_kernel in native.ISAS else None  # the native build, if any
        self._stacked: dict[str, torch.Tensor] = {}  # the layer's experts stored as one tensor per part (GGUF)
        self._unread: dict[str, tuple[str, int]] = {}  # quantized GGUF matrices without a kernel: type, dense bytes

    def build(self, progress=None) -> DecoderModel:
        layers = []
        for i in range(self.config.num_layers):
            layers.append(self._layer(i))
            if progress is not None:
                progress(i + 1, self.config.num_layers)
        head_part = "embed" if self.config.tie_word_embeddings else "lm_head"
        lm_head = self._q8_head(head_part) or self._stored_head(head_part)
        embed = self._stored_rows("embed")  # stored tied: ``_stored_head`` made the same tensor the head
        if embed is None:
            embed = self._tensor("embed", dtype=self.head_dtype)
        if lm_head is None and not self.config.tie_word_embeddings:
            lm_head = DenseLinear(self._tensor("lm_head", dtype=self.head_dtype), None)
        model = DecoderModel(self.config, self.dtype, embed, layers, lm_head)
        if self._unread:
            log.warning("no native kernel for %s: %d matrices were dequantized to %s (%.0f MiB)",
                        ", ".join(sorted({kind for kind, _ in self._unread.values()})), len(self._unread),
                        str(self.dtype).removeprefix("torch."), sum(size for _, size in self._unread.values()) / 2**20)
        if self.shard is not None:
            model.vocab_parallel = VocabParallel(self.shard, self.full.vocab_size, self.group)
        model.final_norm.weight = self._norm_weight("final_norm", dtype=self.head_dtype)
        if self.config.mtp_layers:
            model.mtp = self._draft_head(model)
        if isinstance(lm_head, Q8Linear | StoredLinear):
            model.final_norm = self._fused_norm(model.final_norm, lm_head)
        if flash.fits(self.device, self.dtype, self.config.head_dim):
            model.use_varlen_attention(flash.flash_kernel())
        elif self.device.type == "cpu":
            model.use_varlen_attention(sequential_varlen, prompts_only=True)
        return model.eval()

    def _q8_head(self, part: str) -> Q8Linear | None:
        """With the native kernels, an 8-bit stored head (GGUF Q8_0) runs as stored instead of at fp16."""
        if self.isa is None or (stored := self.source.int8(self._name(part))) is None:
            return None
        return Q8Linear(*stored, isa=self.isa) if q8head.fits(stored[0]) else None

    def _stored(self, name: str) -> gguf_matmul.StoredMatrix | None:
        """A GGUF matrix the native kernels compute on as stored (never under tensor parallelism)."""
        if self.isa is None or self.shard is not None or (stored := self.source.stored(name)) is None:
            return None
        if not gguf_matmul.fits(stored):
            self._unread[name] = (stored.type.name, stored.out_features * stored.in_features * self.dtype.itemsize)
            return None
        return stored

    def _stored_head(self, part: str) -> StoredLinear | None:
        """The LM head on the native kernels, in the type the file stores it (Q6_K in Q4_K_M files), on fp32
        activations (the kernels read bf16 or fp32; the head's precision is fp16 on AVX512-FP16 hosts)."""
        stored = self._stored(self._name(part))
        if stored is None:
            return None
        return StoredLinear([stored], [None], None, isa=self.isa, dtype=torch.float32, out_dtype=torch.float32)

    def _stored_rows(self, part: str) -> StoredRows | None:
        """The embedding table looked up in the mapped file, when it is stored quantized in a type the kernels read."""
        stored = self._stored(self._name(part))
        return None if stored is None else StoredRows(stored, self.isa, self.head_dtype)

    def _name(self, part: str, layer: int | None = None, expert: int | None = None) -> str:
        return self.names[part].format(i=layer, j=expert)

    def _stacked_part(self, part: str, expert: int | None) -> bool:
        """Whether ``part`` of an expert is a slice of one tensor holding every expert's."""
        return expert is not None and "{j}" not in self.names[part]

    def _tensor(self, part: str, layer: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._read(part, self._name(part, layer)).to(device=self.device, dtype=dtype or self.dtype)

    def _read(self, part: str, name: str) -> torch.Tensor:
        """``part`` as this rank holds it: whole, or only its slices read from the source (split models)."""
        order = self._row_order(part)
        spans = self.shard.spans(part, self.full) if self.shard is not None else None
        if spans is None or order is not None:  # llama.cpp's row order is undone on the whole tensor first
            weight = self.source.dense(name)
            weight = weight if order is None else weight[order]
            return weight if self.shard is None else self.shard.slice(part, weight, self.full).clone()
        pieces = [self.source.dense_slice(name, span.dim, span.start, span.stop) for span in spans]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _norm(self, part: str, layer: int) -> RMSNorm:
        norm = RMSNorm(self.config.head_dim, self.config.rms_norm_eps, self.dtype)
        norm.weight = self._norm_weight(part, layer)
        return norm

    def _norm_weight(self, part: str, layer: int | None = None, dtype: torch.dtype | None = None) -> nn.Parameter:
        """An RMSNorm's scale (hybrid Qwen folders store it as an offset from 1: their norms scale by 1 + weight)."""
        if not self.unit_offset_norms:
            return self._parameter(part, layer, dtype)
        weight = self.source.dense(self._name(part, layer)).float() + 1
        return nn.Parameter(weight.to(device=self.device, dtype=dtype or self.dtype), requires_grad=False)

    def _parameter(self, part: str, layer: int | None = None, dtype: torch.dtype | None = None) -> nn.Parameter:
        return nn.Parameter(self._tensor(part, layer, dtype), requires_grad=False)

    def _optional(self, part: str, layer: int) -> torch.Tensor | None:
        if part not in self.names or self._name(part, layer) not in self.source:
            return None
        return self._tensor(part, layer)

    def _layer(self, i: int) -> DecoderLayer:
        return self._assemble(i, self._linear_attention(i) if i in self.config.linear_layers else self._attention(i))

    def _draft_head(self, model: DecoderModel) -> DraftHead:
        """The multi-token-prediction block: ``mtp.layers.0.*`` beside ``mtp.fc`` and its norms in a folder, one more
        block after the model's in a GGUF file (its final norm there optional: the model's then). Its head is the
        model's, applying the block's own final norm."""
        c, names = self.config, self.names
        in_file = "{i}" in names["mtp_fc"]
        index = c.num_layers if in_file else 0
        if not in_file:
            self.names = drafting_layer_names(names)
        try:
            layer = self._assemble(index, self._attention(index))
            fc = self._linear(["mtp_fc"], index, [None])
            norms = [self._norm_weight(part, index) for part in ("mtp_embed_norm", "mtp_hidden_norm")]
            final = "mtp_norm" if self._name("mtp_norm", index) in self.source else "final_norm"
            norm = self._norm_weight(final, index, dtype=self.head_dtype)
        finally:
            self.names = names
        head = None
        if isinstance(model.lm_head, Q8Linear | StoredLinear):  # its kernel normalizes its rows: a copy with ours
            head = copy.copy(model.lm_head)
            head.matmul = copy.copy(head.matmul)
            head.matmul.fuse_norm(norm, c.rms_norm_eps)
        return DraftHead(c, self.dtype, fc, layer, *norms, model.final_norm.weight, norm, head)

    def _assemble(self, i: int, mixer: Attention | GatedDeltaNet) -> DecoderLayer:
        """Layer ``i`` around its token mixer: norms (fused into native kernels that apply them) and the MLP."""
        mlp = self._mlp(i)
        layer = DecoderLayer(self.config, self.dtype, mixer, mlp)
        layer.attn_norm.weight = self._norm_weight("attn_norm", i)
        layer.mlp_norm.weight = self._norm_weight("mlp_norm", i)
        first = mixer.in_proj if isinstance(mixer, GatedDeltaNet) else mixer.qkv
        if isinstance(first, Q4Q8Linear | StoredLinear):
            layer.attn_norm = self._fused_norm(layer.attn_norm, first)
        if isinstance(mlp, MLP) and isinstance(mlp.gate_up, Q4Q8Linear | StoredLinear):
            layer.mlp_norm = self._fused_norm(layer.mlp_norm, mlp.gate_up)
        mlps = [mlp] if isinstance(mlp, MLP) else [*mlp.experts, *([mlp.shared] if mlp.shared else [])]
        for each in mlps:
            if fuses(each.down):  # the activation inside the down projection's kernel
                each.fuse_activation()
        return layer

    def _linear_attention(self, i: int) -> GatedDeltaNet:
        """A Gated DeltaNet layer: queries, keys, values and z in one matrix, b and a in another (small, often kept
        unquantized in GGUF files)."""
        main = ["lin_qkvz"] if "lin_qkvz" in self.names else ["lin_qkv", "lin_z"]
        gates = ["lin_ba"] if "lin_ba" in self.names and self._name("lin_ba", i) in self.source else ["lin_b", "lin_a"]
        conv = self._tensor("lin_conv", i)
        decay_rate = (-self._tensor("lin_minus_a", i, torch.float32) if "lin_minus_a" in self.names
                      else self._tensor("lin_a_log", i, torch.float32).exp())
        layer = GatedDeltaNet(self.config, self._linear(main, i, [None] * len(main)),
                              self._linear(gates, i, [None] * len(gates)), conv.reshape(conv.shape[0], -1),
                              decay_rate, self._tensor("lin_dt_bias", i), self._tensor("lin_norm", i),
                              self._linear(["lin_out"], i, [None]))
        if self.isa is not None and recurrent_kernel.fits(self.config):
            layer.decode_kernel = recurrent_kernel.DeltaRuleDecode(self.config, self.isa, layer)
        return layer

    def _attention(self, i: int) -> Attention:
        if "qkv" in self.names:
            qkv = self._linear(["qkv"], i, [self._optional("qkv_bias", i)])
        else:
            biases = [self._optional(f"{p}_bias", i) for p in "qkv"]
            qkv = self._linear(["q", "k", "v"], i, biases)
        attention = Attention(self.config, qkv, self._reduced(self._linear(["o"], i, [None])))
        c = self.config
        if c.qk_norm:
            attention.q_norm = self._norm("q_norm", i)
            attention.k_norm = self._norm("k_norm", i)
        if self.isa is not None and attention_kernel.fits(c.head_dim, c.rotated_dim):
            attention.decode_attention = attention_kernel.PagedDecodeAttention(
                c.num_heads, c.num_kv_heads, c.head_dim, isa=self.isa, rotated_dim=c.rotated_dim,
                q_norm=attention.q_norm, k_norm=attention.k_norm)
        return attention

    def _packed_linear(self, fused: Int4Weight, bias: torch.Tensor | None) -> nn.Module | None:
        """The 4-bit weight on the int4 kernel chosen for this device, or None where that kernel does not fit it."""
        if self.int4_kernel == CUDA_INT4:
            if not fused.fits_cuda():
                return None
            packed, scales_and_zeros = fused.pack_for_cuda(self.device)
            return CudaInt4Linear(packed, scales_and_zeros, fused.group_size, fused.out_features, bias)
        if self.int4_kernel == TRITON_INT4:
            if not triton_int4.fits(fused):
                return None
            return TritonInt4Linear(*triton_int4.pack(fused, self.device, self.dtype), fused.group_size, bias)
        if self.isa is not None and q4q8.fits(fused):
            return Q4Q8Linear(q4q8.pack(fused), bias, isa=self.isa, dtype=self.dtype)
        packed, scales_and_zeros = fused.pack_for_cpu(self.dtype)
        return Int4Linear(packed, scales_and_zeros, fused.group_size, fused.out_features, bias)

    def _mlp(self, i: int) -> MLP | SparseMoE:
        c = self.config
        if not c.sparse_layer(i):
            return MLP(self._linear(["gate", "up"], i, [None, None]), self._reduced(self._linear(["down"], i, [None])))
        experts = [MLP(self._linear(["expert_gate", "expert_up"], i, [None, None], expert=j),
                       self._linear(["expert_down"], i, [None], expert=j)) for j in range(c.num_experts)]
        self._stacked.clear()
        shared = shared_gate = None
        if c.shared_expert_intermediate_size:
            shared = MLP(self._linear(["shared_gate", "shared_up"], i, [None, None]),
                         self._linear(["shared_down"], i, [None]))
            shared_gate = DenseLinear(self._tensor("shared_expert_gate", i), None)
        return SparseMoE(DenseLinear(self._tensor("router", i), None), experts, c.experts_per_token,
                         c.norm_topk_prob, shared, shared_gate)

    def _reduced(self, linear: nn.Module) -> nn.Module:
        """A row-parallel linear's partial sums added up over the ranks (the linear itself when not split)."""
        return linear if self.shard is None else RowParallel(linear, self.group)

    @staticmethod
    def _fused_norm(norm: RMSNorm, linear: NativeLinear) -> nn.Module:
        """The native kernels normalize their own input rows: one call instead of a norm's ~8 small ops."""
        linear.fuse_norm(norm)
        return nn.Identity()

    def _row_order(self, part: str) -> torch.Tensor | None:
        """Undo llama.cpp's q/k row permutation so that rotate-half RoPE applies; Qwen3-Next's input projections,
        grouped per key head, into Qwen3.5's order (all queries, keys, values, z; all b, a)."""
        if part in ("lin_qkvz", "lin_ba"):
            return self._grouped_order(part)
        if not self.rope_permuted or part not in ("q", "k"):
            return None
        heads = self.full.num_heads if part == "q" else self.full.num_kv_heads
        half = self.full.head_dim // 2
        return torch.arange(heads * half * 2).view(heads, half, 2).transpose(1, 2).reshape(-1)

    def _grouped_order(self, part: str) -> torch.Tensor:
        """Rows of Qwen3-Next's ``in_proj_qkvz`` ([q, k, v, z] per key head) or ``in_proj_ba`` ([b, a] per key
        head) in the order of Qwen3.5's separate projections."""
        c = self.full
        per_key_head = c.linear_value_heads // c.linear_key_heads
        widths = ([c.linear_key_dim] * 2 + [per_key_head * c.linear_value_dim] * 2 if part == "lin_qkvz"
                  else [per_key_head] * 2)
        rows = torch.arange(c.linear_key_heads * sum(widths)).view(c.linear_key_heads, sum(widths))
        return torch.cat([group.reshape(-1) for group in rows.split(widths, dim=1)])

    def _linear(self, parts: list[str], i: int, biases: list[torch.Tensor | None],
                 expert: int | None = None) -> nn.Module:
        names = [self._name(p, i, expert) for p in parts]
        stacked = any(self._stacked_part(p, expert) for p in parts)  # experts stored as one tensor per part
        quantized = [self.source.int4(n) for n in names] if self.int4_kernel and not stacked else []
        if quantized and all(q is not None for q in quantized):
            weights = [q if (order := self._row_order(p)) is None else q.rows(order)
                       for p, q in zip(parts, quantized, strict=True)]
            if Int4Weight.stackable(weights):
                fused = Int4Weight.cat(weights)
                linear = self._packed_linear(fused, self._fused_bias(biases, [w.out_features for w in weights]))
                if linear is not None and fused.input_order is not None:
                    return ReorderedInputs(fused.input_order.to(self.device), linear)
                if linear is not None:
                    return linear
        stored = [self._stored_rows_of(p, n, expert) for p, n in zip(parts, names, strict=True)]
        if all(s is not None for s in stored):
            return self._stored_linear(parts, stored, biases)
        dense = []
        for part, name in zip(parts, names, strict=True):
            if self._stacked_part(part, expert):
                if name not in self._stacked:
                    self._stacked[name] = self.source.dense(name)
                weight = self._stacked[name][expert]
            else:
                weight = self._read(part, name)
            dense.append(weight.to(device=self.device, dtype=self.dtype))
        bias = self._fused_bias(biases, [w.shape[0] for w in dense])
        return DenseLinear(dense[0] if len(dense) == 1 else torch.cat(dense), bias)

    def _stored_rows_of(self, part: str, name: str, expert: int | None) -> gguf_matmul.StoredMatrix | None:
        """``name`` as stored; for one expert of a stacked part, that expert's rows of the stack."""
        stored = self._stored(name)
        if stored is None or not self._stacked_part(part, expert):
            return stored
        rows = stored.out_features // self.config.num_experts
        return gguf_matmul.StoredMatrix(stored.blocks[expert * rows : (expert + 1) * rows], stored.type,
                                        stored.in_features)

    def _stored_linear(self, parts: list[str], stored: list[gguf_matmul.StoredMatrix],
                       biases: list[torch.Tensor | None]) -> StoredLinear:
        """Fused parts as the file stores them; llama.cpp's permuted q/k rows are written to their model order."""
        columns, start = [], 0
        for part, matrix in zip(parts, stored, strict=True):
            order = self._row_order(part)
            columns.append(None if order is None else start + torch.argsort(order))
            start += matrix.out_features
        bias = self._fused_bias(biases, [m.out_features for m in stored])
        return StoredLinear(stored, columns, bias, isa=self.isa, dtype=self.dtype)

    def _fused_bias(self, biases: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor | None:
        """One bias for fused parts; a part without one contributes zeros."""
        if all(b is None for b in biases):
            return None
        return torch.cat([b if b is not None else torch.zeros(n, device=self.device, dtype=self.dtype)
                          for b, n in zip(biases, rows, strict=True)])
