"""Resolve ``--model`` (hub id, local folder, ``.gguf`` file, or the embedded default) and load it."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.device import cuda_capability
from engine.kernels import native, triton_decode
from engine.model import DecoderModel
from engine.parallel import Shard
from engine.quant import QuantizedSource, QuantScheme
from engine.quant.at_load import QuantizingSource
from engine.weights.builder import ModelBuilder
from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from engine.weights.gguf_tensors import GGUFTensors
from engine.weights.int4 import CUDA_INT4, CUDA_INT4_KERNELS, TRITON_INT4
from engine.weights.sources import (
    GGUF_HYBRID_NAMES,
    GGUF_NAMES,
    HF_NAMES,
    QWEN1_NAMES,
    QWEN3_NEXT_NAMES,
    GGUFSource,
    SafetensorsSource,
    WeightSource,
)
from tokenizer import HFTokenizer, QwenTokenizer, Tokenizer
from tokenizer.chat import builtin_template
from tokenizer.gguf_metadata import gguf_metadata

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "tokenizer*", "*.jinja"]


@dataclass
class LoadedModel:
    """A model ready to run, with what came beside it in the checkpoint."""

    name: str
    path: Path
    config: ModelConfig
    model: DecoderModel
    tokenizer: Tokenizer | None
    generation_config: dict[str, Any] = field(default_factory=dict)


def resolve_model_path(model: str | None) -> Path:
    """The embedded SmolLM2 for None; an existing file or folder as is; otherwise a hub id, downloaded (or
    found in the local hub cache; ``HF_HUB_OFFLINE=1`` is honoured) with ``huggingface_hub``."""
    if model is None:
        return asset_path(SMOLLM2_GGUF)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise FileNotFoundError(f"model {model!r} is neither a local file or folder nor a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise FileNotFoundError(f"model {model!r} is not a local path, not in the hub cache, and could not be "
                                f"downloaded: {exc}") from exc


def int4_kernel_for(device: torch.device, dtype: torch.dtype, cpu_isa: str = "auto", *,
                    dtype_chosen: bool = False, cuda_kernel: str = "auto") -> str | None:
    """Which kernel keeps 4-bit weights packed, or None to dequantize them as they load.

    CUDA (``cuda_kernel`` "auto"): torch's int4 kernel (tinygemm) for bf16 on sm80+ (Qwen-7B shapes on an H200:
    315 tok/s at batch 1 against the Triton kernels' 263, though 1,569 against 3,329 at 64 streams), else the
    Triton kernels for bf16/fp16 where Triton imports, else dense; "tinygemm" or "triton" asks for that one (an
    error where it cannot run).

    bf16: the native kernels built for ``cpu_isa`` ("avx512", "avx2"; "auto": the fastest build this CPU runs, else
    torch's) or torch's weight-only kernel ("torch"). fp32: the native kernels with fp32 activations when a build
    is named, or with "auto" when fp32 was chosen because the CPU has no fast bf16 (``dtype_chosen``); an fp32
    model asked for by name is the exact, dense path the reference tests use."""
    if cpu_isa not in ("auto", "torch", *native.ISAS):
        raise ValueError(f"unknown cpu_isa {cpu_isa!r}; use auto, {', '.join(native.ISAS)} or torch")
    if cpu_isa in native.ISAS and cpu_isa not in native.isas():
        raise ValueError(f"cpu_isa {cpu_isa!r}: this CPU or toolchain cannot run that build of the native kernels")
    best = native.isas()[0] if native.isas() else None
    if device.type == "cuda":
        tinygemm = dtype == torch.bfloat16 and cuda_capability(device) >= (8, 0)
        triton = dtype in (torch.bfloat16, torch.float16) and triton_decode.available()
        if cuda_kernel not in CUDA_INT4_KERNELS:
            raise ValueError(f"unknown cuda_int4_kernel {cuda_kernel!r}; use {', '.join(CUDA_INT4_KERNELS)}")
        if cuda_kernel == CUDA_INT4 and not tinygemm:
            raise ValueError("cuda_int4_kernel tinygemm needs bf16 on an sm80 (Ampere) or later card; use triton")
        if cuda_kernel == TRITON_INT4 and not triton:
            raise ValueError("cuda_int4_kernel triton needs Triton and bf16 or fp16 weights")
        if cuda_kernel != "auto":
            return cuda_kernel
        return CUDA_INT4 if tinygemm else TRITON_INT4 if triton else None
    if device.type != "cpu":
        return None
    if dtype == torch.bfloat16:
        return (best or "torch") if cpu_isa == "auto" else cpu_isa
    if dtype == torch.float32:
        return cpu_isa if cpu_isa in native.ISAS else best if cpu_isa == "auto" and dtype_chosen else None
    return None


def load_model(model: str | None, *, dtype: torch.dtype, device: torch.device, int4_kernel: str | None = None,
               progress=None, shard: Shard | None = None, group: dist.ProcessGroup | None = None,
               quantization: str | None = None, speculative: str | None = None) -> LoadedModel:
    """``shard``: load only this rank's slices (tensor parallelism over ``group``). ``quantization`` ("q8_0",
    "q4_0", "q4_k"): a dense checkpoint folder's layer matrices quantized as they load, for the native CPU kernels.
    ``speculative`` ("mtp"): the checkpoint's multi-token-prediction block is built too (``DecoderModel.mtp``)."""
    path = resolve_model_path(model)
    name = model or SMOLLM2_GGUF.filename.removesuffix(".gguf")
    split = {"shard": shard, "group": group}
    if speculative is not None and shard is not None:
        raise ValueError("--speculative runs in one process: drop --tensor-parallel-size")
    if quantization is not None:
        if path.suffix == ".gguf":
            raise ValueError("--quantization applies to checkpoint folders; a GGUF file is served as quantized")
        if int4_kernel not in native.ISAS or shard is not None:
            raise ValueError("--quantization runs on the native CPU kernels: a CPU with AVX2 or AVX512, --cpu-isa "
                             "auto/avx512/avx2, one process")
    if path.suffix == ".gguf":
        return _load_gguf(name, path, dtype, device, int4_kernel, progress, split, speculative)
    return _load_folder(name, path, dtype, device, int4_kernel, progress, split, quantization, speculative)


def drafting_layers(raw_config: dict[str, Any]) -> int:
    """Multi-token-prediction blocks a folder's ``config.json`` says the checkpoint ships."""
    text = raw_config.get("text_config") or raw_config
    return text.get("mtp_num_hidden_layers") or text.get("num_nextn_predict_layers") or 0


def with_drafter(config: ModelConfig, shipped: int, speculative: str | None, name: str) -> ModelConfig:
    """``config`` built with its multi-token-prediction block when ``speculative`` asks for it (``shipped``: the
    blocks the checkpoint has)."""
    if speculative is None:
        return config
    if not shipped:
        raise ValueError(f"{name} has no multi-token-prediction weights (mtp.* in a folder, nextn blocks in a GGUF "
                         "file): --speculative mtp needs them")
    return dataclasses.replace(config, mtp_layers=1)


def _load_gguf(name: str, path: Path, dtype: torch.dtype, device: torch.device, int4_kernel: str | None,
               progress, split: dict[str, Any], speculative: str | None = None) -> LoadedModel:
    tensors = GGUFTensors(path)
    metadata = gguf_metadata(tensors.reader)
    blocks = metadata.get(f"{metadata['general.architecture']}.block_count", 0)
    dense_mlp = tuple(i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" not in tensors)
    config = ModelConfig.from_gguf(metadata, has_output_weight="output.weight" in tensors, mlp_only_layers=dense_mlp)
    shipped = metadata.get(f"{metadata['general.architecture']}.nextn_predict_layers", 0)
    config = with_drafter(config, shipped, speculative, name)
    names = GGUF_HYBRID_NAMES if config.hybrid else GGUF_NAMES
    builder = ModelBuilder(config, GGUFSource(tensors), names, dtype, device, int4_kernel=int4_kernel,
                           rope_permuted=config.arch == "llama", **split)
    tokenizer = with_builtin_template(HFTokenizer.from_gguf_metadata(metadata), config.arch)
    return LoadedModel(name, path, config, builder.build(progress), tokenizer)


def _load_folder(name: str, folder: Path, dtype: torch.dtype, device: torch.device, int4_kernel: str | None,
                 progress, split: dict[str, Any], quantization: str | None = None,
                 speculative: str | None = None) -> LoadedModel:
    raw_config = json.loads((folder / "config.json").read_text())
    config = ModelConfig.from_hf(raw_config)
    config = with_drafter(config, drafting_layers(raw_config), speculative, name)
    names = QWEN1_NAMES if config.arch == "qwen" else QWEN3_NEXT_NAMES if config.arch == "qwen3_next" else HF_NAMES
    scheme = None
    if raw_config.get("quantization_config"):
        try:
            scheme = QuantScheme.from_config(raw_config["quantization_config"])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
    source: WeightSource = SafetensorsSource(folder)
    if "text_config" in raw_config:  # a multimodal checkpoint (Qwen3.5): its language model, under its own prefix
        names = {part: name.replace("model.", "model.language_model.", 1) for part, name in names.items()}
        log.info("%s: serving the text model; the vision tower's weights are not loaded (no image input yet)", name)
    if scheme is not None and quantization is not None:
        raise ValueError(f"{name} is already quantized ({scheme.method}); --quantization is for dense checkpoints")
    if scheme is not None:
        source = QuantizedSource(source, scheme)
    if quantization is not None:
        source = QuantizingSource(source, quantization, keep={names["embed"], names["lm_head"]})
    model = ModelBuilder(config, source, names, dtype, device, int4_kernel=int4_kernel,
                         unit_offset_norms=config.hybrid, **split).build(progress)
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    tokenizer = with_builtin_template(load_folder_tokenizer(folder), config.arch)
    return LoadedModel(name, folder, config, model, tokenizer, generation)


def with_builtin_template(tokenizer: Tokenizer | None, arch: str) -> Tokenizer | None:
    """``tokenizer``, given its architecture's documented chat template when the checkpoint brought none."""
    if tokenizer is not None and tokenizer.chat_template is None:
        tokenizer.chat_template = builtin_template(arch)
    return tokenizer


def load_folder_tokenizer(folder: Path) -> Tokenizer | None:
    """``qwen.tiktoken`` (Qwen-1), else ``tokenizer.json``, else None (token-id prompts only)."""
    if (folder / "qwen.tiktoken").exists():
        return QwenTokenizer(folder / "qwen.tiktoken")
    if (folder / "tokenizer.json").exists():
        return HFTokenizer.from_folder(folder)
    return None
