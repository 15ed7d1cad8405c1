"""Device and dtype selection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def select_device(device: str | torch.device | None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@cache
def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


_SIMULATED_CAPABILITY: ContextVar[tuple[int, int] | None] = ContextVar("simulated_cuda_capability", default=None)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (bf16 and tinygemm's int4 need sm80: Ampere on), or the one a dry run
    simulates."""
    simulated = _SIMULATED_CAPABILITY.get()
    return simulated if simulated is not None else torch.cuda.get_device_capability(device)


FP8_CAPABILITY = (8, 9)  # the first CUDA cards with fp8 conversions (Ada)


def reads_fp8(device: torch.device) -> bool:
    """Whether an fp8 KV cache can be read here: on CPU (torch's conversions) always, on a CUDA card (or the one a
    dry run simulates) from sm89 on."""
    if device.type == "cuda" or _SIMULATED_CAPABILITY.get() is not None:
        return cuda_capability(device) >= FP8_CAPABILITY
    return True


def on_card(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA card: a real one, or a dry run's stand-in for one (the meta device within
    ``simulated_capability``), so that a dry run takes every CUDA path of the step."""
    return device.type == "cuda" or (device.type == "meta" and _SIMULATED_CAPABILITY.get() is not None)


@contextmanager
def simulated_capability(capability: tuple[int, int]) -> Iterator[None]:
    """Within: every choice that depends on the CUDA card is made for one of ``capability`` (dry runs, where the
    card is a fake one)."""
    token = _SIMULATED_CAPABILITY.set(capability)
    try:
        yield
    finally:
        _SIMULATED_CAPABILITY.reset(token)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls (and torch's int4 weight-only kernel) run natively."""
    return "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()


def head_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Precision of the embedding table and LM head. On CPU, bf16 logits are too coarse (0.125 around 25) and
    fp32 costs no more time at batch 1; with AVX512-FP16, fp16 is faster at larger batches and 8x finer."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    return torch.float16 if "avx512_fp16" in cpu_flags() else torch.float32


def select_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, else bf16 on CUDA from sm80 (fp16 before: its bf16 is emulated) and on CPUs with native
    bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if cuda_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
