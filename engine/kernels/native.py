"""The native CPU kernels (``quant_matmul.cpp``, ``gguf_matmul.cpp`` and ``recurrent.cpp`` over ``simd.h``, and the
load-time quantizer ``quantize.cpp``): built once per instruction set into one library, loaded with ctypes.

One source, three builds: ``avx512`` (AVX512 F/BW/VL with VNNI and BF16) and ``avx2`` (AVX2 with FMA), which
compute the same bits, and ``amx`` (avx512's, with steps of several rows on AMX tiles: ``amx.h``, where the kernel
must also grant the process its tiles). Each is compiled with the system's C++ compiler (``$CXX``, else ``g++``)
and cached next to the fetched assets under a name that covers the sources and the flags (``qwen-serve-assets``
builds them ahead, as the image build does; a server without a compiler then still finds them). ``isas()`` lists
the builds this CPU can run, fastest first; without any (or without a compiler) callers keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from engine.device import cpu_flags
from engine.weights.embedded import cache_dir

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("quant_matmul.cpp", "gguf_matmul.cpp", "recurrent.cpp", "quantize.cpp"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "amx.h", "gguf_tiles.h", "gguf_lanes.h"))
# per build: the CPU flags it needs, and the compiler flags for exactly those (not -march=native: a build, e.g. in
# an image, runs on any CPU that has them)
_AVX512 = (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c"),
           ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mfma", "-mf16c"])
ISAS = {
    "amx": ((*_AVX512[0], "amx_tile", "amx_int8"), [*_AVX512[1], "-mamx-tile", "-mamx-int8"]),
    "avx512": _AVX512,
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
# The builds whose every kernel computes the same bits: the amx build runs avx512's kernels too, except GGUF
# products of several rows, which it sums on AMX tiles in another float32 order (``gguf_tiles.h``; its repacked
# 4-bit products on tiles keep avx512's bits).
SAME_BITS = ("avx512", "avx2")
COMMON_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

log = logging.getLogger(__name__)


def runs_here(isa: str) -> bool:
    """Whether this CPU has the instruction sets of build ``isa``."""
    return set(ISAS[isa][0]) <= set(cpu_flags().split())


@cache
def isas() -> tuple[str, ...]:
    """The builds this CPU runs and this machine could build or find, fastest first."""
    return tuple(isa for isa in ISAS if library(isa) is not None)


@cache
def library(isa: str) -> ctypes.CDLL | None:
    """The kernels built for ``isa``, loaded, or None where they cannot run."""
    if not runs_here(isa):
        return None
    target = build(isa)
    if target is None:
        return None
    lib = ctypes.CDLL(str(target))
    if isa == "amx" and not lib.tiles_enabled():
        log.warning("the kernel does not grant this process AMX tiles: the amx build is not used")
        return None
    pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    eps = ctypes.c_float
    lib.q4q8_linear.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int, size, pointer,
                                size, pointer, eps, ctypes.c_int, ctypes.c_int, pointer, threads]
    lib.q4q8_linear.restype = None
    lib.q8_head.argtypes = [pointer, pointer, size, size, pointer, size, pointer, eps, pointer, threads]
    lib.q8_head.restype = None
    lib.paged_decode_attention.argtypes = ([pointer] * 3 + [eps] + [pointer] * 10 + [size] * 6
                                           + [eps, ctypes.c_int, pointer, threads])
    lib.paged_decode_attention.restype = None
    lib.gguf_linear.argtypes = [pointer, size, size, size, ctypes.c_int, pointer, ctypes.c_int, size, size, pointer,
                                size, pointer, eps, ctypes.c_int, ctypes.c_int, pointer, threads]
    lib.gguf_linear.restype = None
    lib.gguf_rows.argtypes = [pointer, size, size, pointer, size, pointer]
    lib.gguf_rows.restype = None
    lib.gguf_dequantize.argtypes = [pointer, size, size, size, pointer, pointer, threads]
    lib.gguf_dequantize.restype = None
    lib.gated_delta_decode.argtypes = [pointer] * 11 + [eps] + [size] * 6 + [ctypes.c_int, ctypes.c_int, pointer,
                                                                              pointer, threads]
    lib.gated_delta_decode.restype = None
    lib.quantize_q4_k.argtypes = [pointer, size, size, pointer, threads]
    lib.quantize_q4_k.restype = None
    return lib


def available() -> bool:
    """Whether this CPU and toolchain run some build of the native kernels."""
    return bool(isas())


def build(isa: str) -> Path | None:
    """The kernels compiled for ``isa`` (built now when missing), or None when they cannot be built here."""
    flags = [*COMMON_FLAGS, *ISAS[isa][1]]
    sources = b"".join(source.read_bytes() for source in SOURCES)
    headers = b"".join(header.read_bytes() for header in HEADERS)
    key = hashlib.sha256(sources + headers + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"quant_matmul-{isa}-{key}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler: quantized weights run on torch's kernels")
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                log.warning("native kernels not built, using torch's: %s", result.stderr.strip()[-2000:])
                return None
            os.replace(built, target)
    except OSError as exc:
        log.warning("native kernels not built (%s), using torch's", exc)
        return None
    return target


class RowKernel:
    """A native matmul over rows ``x`` [M, in] with its weight's arguments bound once (batch-1 decode makes ~120
    calls a step, so a call should cost little more than the kernel) and, after ``fuse_norm``, an RMSNorm applied
    to each row inside the kernel (fp32, before quantizing). A ``fusable`` kernel (the layer matmuls) also takes
    an MLP's gate and up halves and applies SwiGLU first (after ``fuse_swiglu``: rows [M, 2 in]), and adds its
    result into a residual in place."""

    def __init__(self, kernel: Callable[..., None], weight_args: tuple, out_features: int, in_dtype: torch.dtype,
                 out_dtype: torch.dtype, *, fusable: bool = False) -> None:
        self._kernel, self._weight_args = kernel, weight_args
        self.out_features, self.in_dtype, self.out_dtype = out_features, in_dtype, out_dtype
        self.fusable = fusable
        self.norm: torch.Tensor | None = None
        self._norm_args: tuple[int | None, float] = (None, 0.0)
        self.gated = False
        self._threads = torch.get_num_threads()

    def fuse_norm(self, weight: torch.Tensor, eps: float) -> None:
        assert not self.gated, "a projection applies a norm or the activation, not both"
        self.norm = weight.float().contiguous()
        self._norm_args = (self.norm.data_ptr(), eps)

    def fuse_swiglu(self) -> None:
        """Take an MLP's gate/up output and apply SiLU(gate) * up to it first, in fp32 (a down projection)."""
        assert self.fusable and self.norm is None, "a projection applies a norm or the activation, not both"
        self.gated = True

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual`` [M, out] (contiguous, the output dtype): the result is added to it in place, rounded once with
        the sum, and it is returned."""
        x = x.to(self.in_dtype).contiguous()
        if residual is None:
            out = torch.empty((x.shape[0], self.out_features), dtype=self.out_dtype)
        else:
            assert self.fusable and residual.shape == (x.shape[0], self.out_features)
            assert residual.dtype == self.out_dtype and residual.is_contiguous()
            out = residual
        modes = (int(self.gated), int(residual is not None)) if self.fusable else ()
        self._kernel(*self._weight_args, x.data_ptr(), x.shape[0], *self._norm_args, *modes, out.data_ptr(),
                     self._threads)
        return out
