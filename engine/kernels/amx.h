// AMX tiles for the amx build's kernels (gguf_tiles.h, quant_matmul.cpp's q4q8 tiles): the process's permission,
// and each thread's tile shapes. Tile numbers: C tiles 0-3 (16 rows x 64 bytes), A tiles 4-5 (16 rows x `width`
// bytes), B tiles 6-7 (`width` / 4 rows x 64 bytes), for products over `width` inputs at a time.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace amx {

// Whether this process may use the tile registers (Linux grants them on request, once per process).
inline bool enabled() {
    static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
}

struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// The width this thread's tiles are shaped for (0: none). Other libraries on the same threads (oneDNN's GEMMs)
// load their own shapes or release the tiles, so every parallel region that configures them releases them at its
// end.
inline thread_local int configured = 0;

// Tiles shaped for products over `width` inputs (16 or 32), loaded on this thread when they differ.
inline void configure(int width) {
    if (configured == width) return;
    Config config;
    for (int t = 0; t < 4; ++t) config.colsb[t] = 64, config.rows[t] = 16;
    for (int t = 4; t < 6; ++t) config.colsb[t] = (uint16_t)width, config.rows[t] = 16;
    for (int t = 6; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = (uint8_t)(width / 4);
    // the whole 64 bytes as the asm's input (GCC's _tile_loadconfig names only the first 8, so the compiler may drop
    // the stores to the rest)
    __asm__ volatile("ldtilecfg %0" ::"m"(config));
    configured = width;
}

inline void release() {
    if (configured != 0) _tile_release();
    configured = 0;
}

}  // namespace amx

// C tile C = A x B over the tiles' width: A tile A loaded from A_PTR (rows A_STRIDE bytes apart), B tile B from B_PTR
// (rows 64 bytes apart), DOT the product intrinsic (its signedness: _tile_dpbusd, _tile_dpbssd, _tile_dpbsud). The
// intrinsics take tile numbers as literals, hence a macro.
#define AMX_PRODUCT(C, A, B, A_PTR, A_STRIDE, B_PTR, DOT) \
    _tile_zero(C);                                       \
    _tile_loadd(A, A_PTR, A_STRIDE);                     \
    _tile_loadd(B, B_PTR, 64);                           \
    DOT(C, A, B);
