"""llama.cpp's reference Q4_K quantizer (``quantize_row_q4_K_ref``, what ``llama-quantize`` runs without an
importance matrix), compiled from the source in the sdist ``tests.llama_converter`` caches: the functions it needs
taken from ``ggml-quants.c`` and built as C with contraction off, as ggml builds them."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np

from tests.llama_converter import CACHE, QUANTS, SOURCE, ensure_converter

FUNCTIONS = ("static inline int nearest_int(float fval)", "static float make_qkx2_quants(",
             "static inline void get_scale_min_k4(", "void quantize_row_q4_K_ref(")
PRELUDE = """#include <assert.h>
#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#define GGML_RESTRICT restrict
#define QK_K 256
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define GGML_FP32_TO_FP16(x) _cvtss_sh(x, 0)
#define GGML_FP16_TO_FP32(x) _cvtsh_ss(x)
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
"""


def _function(source: str, signature: str) -> str:
    start = source.index(signature)
    return source[start : source.index("\n}\n", start) + 3]


def reference_q4_k() -> ctypes.CDLL:
    """The reference quantizer, built once into the cache directory."""
    ensure_converter()
    library = CACHE / "q4_k_reference.so"
    if not library.is_file():
        source = (SOURCE / QUANTS).read_text()
        c_file = CACHE / "q4_k_reference.c"
        c_file.write_text(PRELUDE + "\n".join(_function(source, signature) for signature in FUNCTIONS))
        compiler = shutil.which("gcc") or shutil.which("cc")
        assert compiler, "a C compiler builds llama.cpp's reference quantizer"
        subprocess.run([compiler, "-O2", "-std=c11", "-mf16c", "-shared", "-fPIC", str(c_file), "-o",
                        str(library)], check=True, timeout=120)
    lib = ctypes.CDLL(str(library))
    lib.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q4_K_ref.restype = None
    return lib


def quantize_q4_k_reference(weight: np.ndarray) -> np.ndarray:
    """``weight`` fp32 [rows, columns] as llama.cpp's Q4_K blocks, uint8 [rows, columns / 256 * 144]."""
    source = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.empty((source.shape[0], source.shape[1] // 256 * 144), dtype=np.uint8)
    reference_q4_k().quantize_row_q4_K_ref(source.ctypes.data, out.ctypes.data, source.size)
    return out
