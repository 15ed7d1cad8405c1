"""CUDA without a GPU: models built for a CUDA card of a given capability (its dtype and kernel choices, its packed
layouts) on torch's fake tensors over the meta device (shapes, dtypes and devices are computed and checked,
nothing is allocated; a host sync or a data-dependent shape raises), and the memory plan ``qwen-serve --dry-run``
prints from one. The meta device stands in for the card: a CPU build of torch cannot index fake CUDA tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.config import ModelConfig
from engine.device import reads_fp8, select_dtype, simulated_capability
from engine.engine import EngineConfig
from engine.kernels import triton_decode, triton_recurrent
from engine.kv_store import kv_bytes_per_token
from engine.linear_attention import GatedDeltaNet, state_bytes_per_sequence
from engine.model import Attention, DecoderModel, SparseMoE
from engine.quant import QuantScheme
from engine.weights.builder import ModelBuilder
from engine.weights.loader import drafting_layers, int4_kernel_for, with_drafter
from engine.weights.shapes import ShapeSource
from engine.weights.sources import HF_NAMES, QWEN1_NAMES, QWEN3_NEXT_NAMES

CUDA = torch.device("cuda")  # the device the choices are made for
STAND_IN = torch.device("meta")  # the device the tensors are made on
ASSUMED_CAPABILITY = (9, 0)  # a plan made without a GPU is for a Hopper card (Ampere and on choose the same)


@contextmanager
def simulated_cuda(capability: tuple[int, int] = ASSUMED_CAPABILITY,
                   mode: FakeTensorMode | None = None) -> Iterator[FakeTensorMode]:
    """Within: tensors are fake (a host sync, a data-dependent shape or a tensor of another device meeting a
    ``STAND_IN`` one raises), and the card's capability is ``capability``. ``mode``: the fake tensor mode to use (a
    subclass can watch every op: modes stacked above it are not consulted under ``torch.inference_mode``)."""
    with simulated_capability(capability), (mode or FakeTensorMode()) as fake:
        yield fake


def fake_model(config: ModelConfig, *, dtype: torch.dtype, quantization: dict | None = None,
               cuda_int4_kernel: str = "auto") -> DecoderModel:
    """``config``'s model built on ``STAND_IN`` (call within ``simulated_cuda``) with the kernels the engine would
    choose on the card: 4-bit matrices of a GPTQ/AWQ ``quantization`` config stay packed where a kernel takes them
    (``cuda_int4_kernel`` as the setting of that name)."""
    names = QWEN1_NAMES if config.arch == "qwen" else QWEN3_NEXT_NAMES if config.arch == "qwen3_next" else HF_NAMES
    group = None
    if quantization:
        scheme = QuantScheme.from_config(quantization)
        if scheme.bits == 4:  # act-order too: its groups are made contiguous at load
            group = scheme.group_size
    act_order = bool(quantization and quantization.get("desc_act", False))
    source = ShapeSource(config, names, STAND_IN, dtype, int4_group_size=group, act_order=act_order)
    kernel = int4_kernel_for(CUDA, dtype, cuda_kernel=cuda_int4_kernel) if group is not None else None
    return ModelBuilder(config, source, names, dtype, STAND_IN, int4_kernel=kernel,
                        unit_offset_norms=config.hybrid).build()


def recurrence_on_triton(config: ModelConfig) -> bool:
    """Whether a card runs the linear layers' delta rule on its Triton kernel (``DecoderModel.use_triton_kernels``)."""
    return triton_decode.available() and triton_recurrent.fits(config.linear_key_dim, config.linear_value_dim)


def kernel_name(linear: nn.Module) -> str:
    """The module's class, and the wrapped linear's where it gathers its inputs first (act-order)."""
    inner = getattr(linear, "linear", None)
    return type(linear).__name__ + ("" if inner is None else f"({type(inner).__name__})")


@dataclass(frozen=True)
class MemoryPlan:
    """What a model takes on one CUDA card, from its config files alone."""

    model: str
    capability: tuple[int, int]
    dtype: torch.dtype
    modules: dict[str, str]  # layer kind -> the module (kernel) that runs it
    weights_bytes: int
    kv_cache_dtype: str
    kv_bytes_per_token: int
    max_model_len: int
    kv_cache_memory: int | None
    state_bytes_per_sequence: int = 0  # hybrid models: one sequence's (or prefix snapshot's) linear-layer states
    state_slots: int = 0  # the seats' (speculative decoding: k + 1 each), the prompt passes' and the prefix snapshots'

    @property
    def seats(self) -> int | None:
        """Sequences at full context the configured KV budget holds (None without one: it is 85% of what is free)."""
        if self.kv_cache_memory is None:
            return None
        return self.kv_cache_memory // (self.kv_bytes_per_token * self.max_model_len)

    def lines(self) -> list[str]:
        gib = 1 << 30
        budget = ("85% of the card's free memory after loading" if self.kv_cache_memory is None
                  else f"{self.kv_cache_memory / gib:.2f} GiB: {self.seats} sequences at {self.max_model_len} tokens")
        return [f"model: {self.model}",
                f"device: cuda, sm{self.capability[0]}{self.capability[1]}",
                f"dtype: {str(self.dtype).removeprefix('torch.')}",
                *(f"{kind}: {module}" for kind, module in self.modules.items()),
                f"weights: {self.weights_bytes / gib:.2f} GiB",
                f"weights_bytes: {self.weights_bytes}",
                f"kv_cache_dtype: {self.kv_cache_dtype}",
                f"kv_bytes_per_token: {self.kv_bytes_per_token}",
                f"kv_cache: {budget}",
                *([f"state_bytes_per_sequence: {self.state_bytes_per_sequence}",
                   f"state_cache: {self.state_slots} slots (seats, drafted tokens' states, prompt passes, prefix "
                   f"snapshots), "
                   f"{self.state_slots * self.state_bytes_per_sequence / gib:.2f} GiB"]
                  if self.state_bytes_per_sequence else [])]


def plan_memory(model_dir: str | Path, *, dtype: str = "auto", max_model_len: int | None = None,
                kv_cache_memory: int | None = None, kv_cache_dtype: str = "auto", cuda_int4_kernel: str = "auto",
                capability: tuple[int, int] | None = None, max_num_seqs: int | None = None,
                state_snapshots: int | None = None, speculative_tokens: int = 0) -> MemoryPlan:
    """The plan for the model folder ``model_dir`` (only ``config.json`` is read) on one CUDA card: this machine's
    when it has one, else one of ``capability`` (default sm90); the other arguments as the settings of their
    names."""
    folder = Path(model_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist (the dry run reads a local model folder's config)")
    raw = json.loads(config_file.read_text())
    config = ModelConfig.from_hf(raw)
    if speculative_tokens:
        config = with_drafter(config, drafting_layers(raw), "mtp", folder.name)
    if capability is None:
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else ASSUMED_CAPABILITY
    with simulated_cuda(capability):
        torch_dtype = select_dtype(None if dtype == "auto" else dtype, CUDA)
        if kv_cache_dtype == "fp8" and not reads_fp8(CUDA):
            raise ValueError(f"kv_cache_dtype fp8 needs sm89 or later; this card is sm{capability[0]}{capability[1]}")
        model = fake_model(config, dtype=torch_dtype, quantization=raw.get("quantization_config"),
                           cuda_int4_kernel=cuda_int4_kernel)
        layer = next(layer for layer in model.layers if isinstance(layer.attn, Attention))
        mlp = layer.mlp.experts[0] if isinstance(layer.mlp, SparseMoE) else layer.mlp
        paged = triton_decode.available() and triton_decode.fits(config.head_dim, EngineConfig.block_size)
        eager_reason = "linear-attention states" if config.hybrid else "routed experts"
        modules = {"attention qkv": kernel_name(layer.attn.qkv), "attention out": kernel_name(layer.attn.o_proj),
                   "mlp gate/up": kernel_name(mlp.gate_up), "mlp down": kernel_name(mlp.down),
                   "lm head": type(model.lm_head).__name__ if model.lm_head is not None else "tied embedding",
                   "decode attention": ("TritonPagedAttention, " + ("CUDA graphs" if model.graph_safe else
                                        f"eager ({eager_reason})")) if paged else "SDPA"}
        linear = next((layer.attn for layer in model.layers if isinstance(layer.attn, GatedDeltaNet)), None)
        if linear is not None:
            modules["linear attention"] = (f"GatedDeltaNet in {len(config.linear_layers)} of {config.num_layers} "
                                           f"layers, in_proj {kernel_name(linear.in_proj)}, "
                                           f"{'Triton' if recurrence_on_triton(config) else 'torch'} recurrence")
        if isinstance(layer.mlp, SparseMoE):
            modules["mlp"] = f"SparseMoE: {config.num_experts} experts, {config.experts_per_token} per token"
        if model.mtp is not None:
            modules["speculative decoding"] = (f"the multi-token-prediction block drafts {speculative_tokens} "
                                               f"tokens a step, fc {kernel_name(model.mtp.fc)}")
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    engine = EngineConfig()
    seats = max_num_seqs or engine.scheduler.max_num_seqs
    snapshots = engine.state_snapshots if state_snapshots is None else state_snapshots
    return MemoryPlan(folder.name, capability, torch_dtype, modules, weights, kv_cache_dtype,
                      kv_bytes_per_token(config, torch_dtype, kv_cache_dtype),
                      min(max_model_len or config.max_model_len, config.max_model_len), kv_cache_memory,
                      state_bytes_per_sequence(config) if config.hybrid else 0,
                      seats * (speculative_tokens + 1) + 1 + snapshots if config.hybrid else 0)
