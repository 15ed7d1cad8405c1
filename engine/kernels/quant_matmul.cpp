// Quantized matmuls and decode attention for the CPU fast path, packed by engine/kernels/q4q8.py and q8head.py.
// Written once over simd.h's 16-lane vectors; built for AVX512 (VNNI, BF16) and for AVX2 (FMA), which give the
// same bits.
//
// q4q8_linear: 4-bit weights times 8-bit activations, the product llama.cpp's Q4_1 x Q8_1 dot computes. Weights: w = q * d + m with q in 0..15 and (d, m) per block of 32 inputs, packed by
// engine/kernels/q4q8.py in tiles of 16 outputs. Activations: each row's blocks of 32 are quantized to int8
// with their own scale (amax / 127), so one outlier only coarsens its own block. For an output n:
//   y = sum_b (d_w[n,b] * d_x[b] * sum_k q_w q_x  +  m_w[n,b] * sum_k x)
// The integer dot of a block is exact (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2: unsigned weight bytes times
// signed activation bytes); the
// block sum of x is taken from the bf16 activations themselves. A row's result never depends on the other
// rows of the call: blocks are accumulated in the same order whatever the batch.
//
// q8_head: Q8_0 weights (int8 q times a scale per block of 32) times activations quantized to int16 per block
// of 32 (vpdpwssd, or vpmaddwd on AVX2), fp32 out: the LM head from GGUF's 8-bit embedding table, without rounding it to fp16 and
// with finer inputs than fp16 (15 bits against each block's largest value).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#if defined(__AMX_INT8__)
#include "amx.h"
#endif

namespace {

using simd::F16;
using simd::I16;

constexpr int kBlock = 32;      // inputs per weight block
constexpr int kHalf = 16;       // inputs per activation block
constexpr int kTile = 16;       // outputs per tile (16 int32 / fp32 lanes)
constexpr int kQuadBytes = 32;  // packed bytes of one 4-input step of a tile: 16 outputs x 4 nibbles
constexpr int kMaxRows = 8;     // rows that share one unpacked weight step

using simd::inverse_rms;
using simd::load_elements;
using simd::store_elements;
using simd::to_float;

struct Activations {
    std::vector<int8_t> q;  // [rows, K]
    std::vector<float> d;   // [rows, K / 32] block scales
    std::vector<float> s;   // [rows, K / 32] block sums of x
};

// Rows of x, optionally RMS-normalized first (norm: fp32 weight [k], or null), into int8 blocks of 16. `gated`: each
// row holds 2k values, SwiGLU's gate and up halves, and the inputs are SiLU(gate) * up in fp32.
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t k, const float* norm, float eps, bool gated, Activations& out) {
    const int64_t blocks = k / kBlock, halves = k / kHalf;
    out.q.resize(rows * k);
    out.d.resize(rows * halves);
    out.s.resize(rows * blocks);
    for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * (gated ? 2 * k : k);
        const float inverse_norm = norm ? inverse_rms([row](int64_t i) { return load_elements(row + i); }, k, eps) : 1.0f;
        for (int64_t b = 0; b < blocks; ++b) {
            F16 v[2];
            for (int h = 0; h < 2; ++h) {
                const int64_t at = b * kBlock + h * kHalf;
                v[h] = load_elements(row + at);
                if (gated) v[h] = simd::mul(simd::silu(v[h]), load_elements(row + k + at));
                if (norm) v[h] = simd::mul(simd::mul(v[h], simd::set1(inverse_norm)), simd::load(norm + at));
                const float amax = simd::reduce_max(simd::abs(v[h]));
                const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
                simd::store_int8(out.q.data() + r * k + at, simd::round_to_int(simd::mul(v[h], simd::set1(inverse))));
                out.d[r * halves + b * 2 + h] = amax / 127.0f;
            }
            out.s[r * blocks + b] = simd::reduce_add(simd::add(v[0], v[1]));
        }
    }
}

template <int ROWS, typename T>
void tile_rows(const uint8_t* wq, const float* wd, const float* wm, const float* bias, int64_t blocks,
               int64_t group_blocks, int64_t k, const int8_t* xq, const float* xd, const float* xs, T* y,
               int64_t n, bool accumulate) {
    F16 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = simd::zero();
    for (int64_t b = 0; b < blocks; ++b) {
        I16 dots[2][ROWS];
        for (int r = 0; r < ROWS; ++r) dots[0][r] = dots[1][r] = simd::izero();
        const uint8_t* steps = wq + b * (kBlock / 4) * kQuadBytes;
        simd::prefetch_ahead(steps, (kBlock / 4) * kQuadBytes);
        // unrolled: a loop's dots[step / 4] would index the accumulators at run time, in memory
#pragma GCC unroll 8
        for (int step = 0; step < kBlock / 4; ++step) {
            const simd::Nibbles w = simd::unpack_nibbles(steps + step * kQuadBytes);
            for (int r = 0; r < ROWS; ++r) {
                const int32_t four = *(const int32_t*)(xq + r * k + b * kBlock + step * 4);
                dots[step / 4][r] = simd::dot4(dots[step / 4][r], w, four);
                if constexpr (ROWS > 1) simd::keep_in_register(dots[step / 4][r]);  // one row: latency-bound chains
            }
        }
        const int64_t group = b / group_blocks;
        const F16 dw = simd::load(wd + group * kTile), mw = simd::load(wm + group * kTile);
        for (int r = 0; r < ROWS; ++r) {
            const float* d = xd + r * 2 * blocks + 2 * b;
            acc[r] = simd::fmadd(simd::to_float(dots[0][r]), simd::mul(dw, simd::set1(d[0])), acc[r]);
            acc[r] = simd::fmadd(simd::to_float(dots[1][r]), simd::mul(dw, simd::set1(d[1])), acc[r]);
            acc[r] = simd::fmadd(mw, simd::set1(xs[r * blocks + b]), acc[r]);
        }
    }
    const F16 b = bias ? simd::load(bias) : simd::zero();
    for (int r = 0; r < ROWS; ++r) {
        const F16 sum = simd::add(acc[r], b);
        store_elements(y + r * n, accumulate ? simd::add(sum, load_elements(y + r * n)) : sum);
    }
}

#if defined(__AMX_INT8__)
// The amx build: one tile of 16 outputs against 16 activation rows (xq: 16 rows, those past `count` zero) on AMX
// tiles. Per block of 32 inputs, each half's exact int32 dots (A: the rows' 16 codes, B: the 4 unpacked steps, which
// are B's layout as packed) are scaled as tile_rows scales them, in the same order: the same bits.
template <typename T>
void tile_rows_on_tiles(const uint8_t* wq, const float* wd, const float* wm, const float* bias, int64_t blocks,
                        int64_t group_blocks, int64_t k, const int8_t* xq, const float* xd, const float* xs, int count,
                        T* y, int64_t n, bool accumulate) {
    amx::configure(kHalf);
    alignas(64) uint8_t steps[2][kBlock / 4][64];     // a block's 8 steps unpacked, two blocks in turn
    alignas(64) int32_t dots[2][2][kTile][kTile];     // per block in turn, per half: [row][output]
    F16 acc[kTile];
    for (int r = 0; r < kTile; ++r) acc[r] = simd::zero();
    // the products of block b: C tiles 0-1 (even blocks) or 2-3 (odd), stored to dots[b % 2]
    auto products = [&](int64_t b) {
        const uint8_t* packed = wq + b * (kBlock / 4) * kQuadBytes;
        simd::prefetch_ahead(packed, (kBlock / 4) * kQuadBytes);
        for (int s = 0; s < kBlock / 4; s += 2) {
            simd::Bytes first, second;
            simd::nibble_pairs(packed + s * kQuadBytes, first, second);
            _mm512_store_si512(steps[b % 2][s], first.v);
            _mm512_store_si512(steps[b % 2][s + 1], second.v);
        }
        const int8_t* a = xq + b * kBlock;
        // A: the rows' codes of each half (signed), B: its 4 unpacked steps (unsigned weights)
#define HALF_PRODUCTS(C0, C1)                                                \
    AMX_PRODUCT(C0, 4, 6, a, k, steps[(C0) / 2][0], _tile_dpbsud)            \
    AMX_PRODUCT(C1, 5, 7, a + kHalf, k, steps[(C0) / 2][4], _tile_dpbsud)    \
    _tile_stored(C0, dots[(C0) / 2][0], 64);                                 \
    _tile_stored(C1, dots[(C0) / 2][1], 64);
        if (b % 2 == 0) {
            HALF_PRODUCTS(0, 1)
        } else {
            HALF_PRODUCTS(2, 3)
        }
#undef HALF_PRODUCTS
    };
    auto scale = [&](int64_t b) {
        const int64_t group = b / group_blocks;
        const F16 dw = simd::load(wd + group * kTile), mw = simd::load(wm + group * kTile);
        for (int r = 0; r < count; ++r) {
            const float* d = xd + r * 2 * blocks + 2 * b;
            const F16 low = simd::to_float(I16{_mm512_load_si512(dots[b % 2][0][r])});
            const F16 high = simd::to_float(I16{_mm512_load_si512(dots[b % 2][1][r])});
            acc[r] = simd::fmadd(low, simd::mul(dw, simd::set1(d[0])), acc[r]);
            acc[r] = simd::fmadd(high, simd::mul(dw, simd::set1(d[1])), acc[r]);
            acc[r] = simd::fmadd(mw, simd::set1(xs[r * blocks + b]), acc[r]);
        }
    };
    products(0);
    for (int64_t b = 1; b < blocks; ++b) {
        products(b);
        scale(b - 1);
    }
    scale(blocks - 1);
    const F16 b = bias ? simd::load(bias) : simd::zero();
    for (int r = 0; r < count; ++r) {
        const F16 sum = simd::add(acc[r], b);
        store_elements(y + r * n, accumulate ? simd::add(sum, load_elements(y + r * n)) : sum);
    }
}
#endif

template <typename T>
void q4q8_rows(const uint8_t* wq, const float* wd, const float* wm, const float* bias, int64_t n, int64_t k,
               int64_t group_blocks, int64_t tile_rows_from, const T* x, int64_t rows, const float* norm, float eps,
               bool gated, bool accumulate, T* y, int threads) {
    using TileFn = decltype(&tile_rows<1, T>);
    static constexpr TileFn tile_fns[kMaxRows] = {tile_rows<1, T>, tile_rows<2, T>, tile_rows<3, T>, tile_rows<4, T>,
                                                  tile_rows<5, T>, tile_rows<6, T>, tile_rows<7, T>, tile_rows<8, T>};
    thread_local Activations act;
    quantize_rows(x, rows, k, norm, eps, gated, act);
    const int64_t blocks = k / kBlock, tiles = n / kTile;
    const int64_t tile_bytes = blocks * (kBlock / 4) * kQuadBytes, tile_scales = blocks / group_blocks * kTile;
#if defined(__AMX_INT8__)
    const bool on_tiles = rows >= tile_rows_from && amx::enabled();
    if (on_tiles) act.q.resize((rows + kTile - 1) / kTile * kTile * k, 0);  // A tiles read whole 16 rows
#else
    (void)tile_rows_from;
#endif
    const int8_t* xq = act.q.data();
    const float *xd = act.d.data(), *xs = act.s.data();
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
#if defined(__AMX_INT8__)
        if (on_tiles) {
            for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
                tile_rows_on_tiles(wq + t * tile_bytes, wd + t * tile_scales, wm + t * tile_scales,
                                   bias ? bias + t * kTile : nullptr, blocks, group_blocks, k, xq + r0 * k,
                                   xd + r0 * 2 * blocks, xs + r0 * blocks, (int)std::min<int64_t>(kTile, rows - r0),
                                   y + r0 * n + t * kTile, n, accumulate);
            }
            continue;
        }
#endif
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
            const int count = (int)std::min<int64_t>(kMaxRows, rows - r0);
            tile_fns[count - 1](wq + t * tile_bytes, wd + t * tile_scales, wm + t * tile_scales,
                                bias ? bias + t * kTile : nullptr, blocks, group_blocks, k, xq + r0 * k,
                                xd + r0 * 2 * blocks, xs + r0 * blocks, y + r0 * n + t * kTile, n, accumulate);
        }
    }
#if defined(__AMX_INT8__)
    amx::release();
#endif
    }
}

struct Activations16 {
    std::vector<int16_t> q;  // [rows, K]
    std::vector<float> d;    // [rows, K / 32]
};

void quantize_rows_16bit(const float* x, int64_t rows, int64_t k, const float* norm, float eps, Activations16& out) {
    const int64_t blocks = k / kBlock;
    out.q.resize(rows * k);
    out.d.resize(rows * blocks);
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * k;
        const float inverse_norm = norm ? inverse_rms([row](int64_t i) { return simd::load(row + i); }, k, eps) : 1.0f;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t at = b * kBlock;
            F16 v0 = simd::load(row + at), v1 = simd::load(row + at + 16);
            if (norm) {
                v0 = simd::mul(simd::mul(v0, simd::set1(inverse_norm)), simd::load(norm + at));
                v1 = simd::mul(simd::mul(v1, simd::set1(inverse_norm)), simd::load(norm + at + 16));
            }
            const float amax = simd::reduce_max(simd::max(simd::abs(v0), simd::abs(v1)));
            const F16 scale = simd::set1(amax > 0.0f ? 32767.0f / amax : 0.0f);
            simd::store_int16(out.q.data() + r * k + at, simd::round_to_int(simd::mul(v0, scale)));
            simd::store_int16(out.q.data() + r * k + at + 16, simd::round_to_int(simd::mul(v1, scale)));
            out.d[r * blocks + b] = amax / 32767.0f;
        }
    }
}

// One tile of 16 outputs: per block of 32 inputs, 16 steps of 2 inputs (32 int8 weights each; element e is
// output e / 2, input e % 2, the pairs vpdpwssd sums).
template <int ROWS>
void head_rows(const int8_t* wq, const float* wd, int64_t blocks, int64_t k, const int16_t* xq, const float* xd,
               float* y, int64_t n) {
    F16 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = simd::zero();
    for (int64_t b = 0; b < blocks; ++b) {
        I16 dots[ROWS];
        for (int r = 0; r < ROWS; ++r) dots[r] = simd::izero();
        const int8_t* steps = wq + b * kBlock * kTile;
        simd::prefetch_ahead(steps, kBlock * kTile);
        for (int step = 0; step < kBlock / 2; ++step) {
            const simd::Pairs w = simd::load_pairs(steps + step * 32);
            for (int r = 0; r < ROWS; ++r) {
                const int32_t pair = *(const int32_t*)(xq + r * k + b * kBlock + step * 2);
                dots[r] = simd::dot2(dots[r], w, pair);
            }
        }
        const F16 dw = simd::load(wd + b * kTile);
        for (int r = 0; r < ROWS; ++r)
            acc[r] = simd::fmadd(simd::to_float(dots[r]), simd::mul(dw, simd::set1(xd[r * blocks + b])), acc[r]);
    }
    for (int r = 0; r < ROWS; ++r) simd::store(y + r * n, acc[r]);
}

using HeadFn = decltype(&head_rows<1>);
constexpr HeadFn kHeadFns[kMaxRows] = {head_rows<1>, head_rows<2>, head_rows<3>, head_rows<4>,
                                       head_rows<5>, head_rows<6>, head_rows<7>, head_rows<8>};

// x rounded to the activations' type (bf16: to nearest, ties to even), as a float
template <typename T>
inline float round_as(float x) {
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        uint32_t bits;
        std::memcpy(&bits, &x, sizeof bits);
        bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
        std::memcpy(&x, &bits, sizeof x);
        return x;
    }
}

// A head's per-head RMSNorm (Qwen3, Qwen3.5) in fp32 with its weight, rounded to T as the model's norm rounds its
// output; null weight: no norm.
struct HeadNorm {
    const void* weight;
    float eps;
};

// One head of a qkv row in fp32, normalised by norm.weight if given, then rotate-half RoPE over its first rotated
// dims: out[i] = x[i] cos[i] + x[i +- rotated/2] sin[i] (sin's first half negated, the runner's layout; cos and sin
// rows of rotated elements), the rest as it is. dim and rotated are multiples of 32, dim at most kMaxHeadDim.
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kRowsAhead = 16;  // cache rows requested ahead of the one a decode attention loop reads
constexpr int64_t kMaxHeadsPerJob = 32;  // query heads a decode attention job takes at most
template <typename T>
inline void rotated_head(const T* x, HeadNorm norm, const T* cos, const T* sin, int64_t dim, int64_t rotated,
                         F16* out) {
    float head[kMaxHeadDim];
    for (int64_t i = 0; i < dim; ++i) head[i] = to_float(x[i]);
    if (norm.weight) {
        float squares = 0.0f;
        for (int64_t i = 0; i < dim; ++i) squares += head[i] * head[i];
        const float inverse = 1.0f / std::sqrt(squares / (float)dim + norm.eps);
        const T* weight = static_cast<const T*>(norm.weight);
        for (int64_t i = 0; i < dim; ++i) head[i] = round_as<T>(head[i] * inverse * to_float(weight[i]));
    }
    const int64_t chunks = dim / 16, turning = rotated / 16, half = turning / 2;
    for (int64_t c = 0; c < chunks; ++c) {
        if (c >= turning) {
            out[c] = simd::load(head + c * 16);
            continue;
        }
        const int64_t partner = c < half ? c + half : c - half;
        out[c] = simd::fmadd(simd::load(head + c * 16), load_elements(cos + c * 16),
                             simd::mul(simd::load(head + partner * 16), load_elements(sin + c * 16)));
    }
}

// A layer's keys and values in the paged cache, one row of dim elements per (slot, kv head): in the
// activations' type, or int8 with one fp32 scale per row (symmetric: q = round-half-even(x * 127 / max|x|), scale
// = max|x| / 127, so x ~ q * scale). Each kind writes a row, dots a query with a key row and adds a weighted value
// row into an accumulator.
template <typename T>
struct PlainCache {
    T* k;
    T* v;
    static void put(T* row, const F16* x, int64_t chunks) {
        for (int64_t c = 0; c < chunks; ++c) store_elements(row + c * 16, x[c]);
    }
    void put_key(int64_t r, const F16* x, int64_t chunks) const { put(k + r * chunks * 16, x, chunks); }
    void put_value(int64_t r, const F16* x, int64_t chunks) const { put(v + r * chunks * 16, x, chunks); }
    void prefetch_keys(int64_t r, int64_t rows, int64_t chunks) const {
        simd::prefetch(k + r * chunks * 16, rows * chunks * 16 * sizeof(T));
    }
    void prefetch_values(int64_t r, int64_t rows, int64_t chunks) const {
        simd::prefetch(v + r * chunks * 16, rows * chunks * 16 * sizeof(T));
    }
    float key_dot(int64_t r, const F16* query, int64_t chunks) const {
        const T* key = k + r * chunks * 16;
        F16 dot = simd::mul(query[0], load_elements(key));
        for (int64_t c = 1; c < chunks; ++c) dot = simd::fmadd(query[c], load_elements(key + c * 16), dot);
        return simd::reduce_add(dot);
    }
    void add_value(int64_t r, float weight, F16* acc, int64_t chunks) const {
        const T* value = v + r * chunks * 16;
        const F16 p = simd::set1(weight);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = simd::fmadd(p, load_elements(value + c * 16), acc[c]);
    }
};

struct Int8Cache {
    int8_t* k;
    int8_t* v;
    float* k_scale;
    float* v_scale;
    static void put(int8_t* row, float* scale, const F16* x, int64_t chunks) {
        F16 peak = simd::abs(x[0]);
        for (int64_t c = 1; c < chunks; ++c) peak = simd::max(peak, simd::abs(x[c]));
        const float amax = simd::reduce_max(peak);
        const F16 inverse = simd::set1(amax > 0 ? 127.0f / amax : 0.0f);
        for (int64_t c = 0; c < chunks; ++c) simd::store_int8(row + c * 16, simd::round_to_int(simd::mul(x[c], inverse)));
        *scale = amax / 127.0f;
    }
    void put_key(int64_t r, const F16* x, int64_t chunks) const { put(k + r * chunks * 16, k_scale + r, x, chunks); }
    void put_value(int64_t r, const F16* x, int64_t chunks) const { put(v + r * chunks * 16, v_scale + r, x, chunks); }
    void prefetch_keys(int64_t r, int64_t rows, int64_t chunks) const {
        simd::prefetch(k + r * chunks * 16, rows * chunks * 16);
        simd::prefetch(k_scale + r, rows * 4);
    }
    void prefetch_values(int64_t r, int64_t rows, int64_t chunks) const {
        simd::prefetch(v + r * chunks * 16, rows * chunks * 16);
        simd::prefetch(v_scale + r, rows * 4);
    }
    float key_dot(int64_t r, const F16* query, int64_t chunks) const {
        const int8_t* key = k + r * chunks * 16;
        F16 dot = simd::mul(query[0], simd::load_int8(key));
        for (int64_t c = 1; c < chunks; ++c) dot = simd::fmadd(query[c], simd::load_int8(key + c * 16), dot);
        return simd::reduce_add(dot) * k_scale[r];
    }
    void add_value(int64_t r, float weight, F16* acc, int64_t chunks) const {
        const int8_t* value = v + r * chunks * 16;
        const F16 p = simd::set1(weight * v_scale[r]);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = simd::fmadd(p, simd::load_int8(value + c * 16), acc[c]);
    }
};

// A decode step's attention for sequences with one new token each, from the fused qkv projection [batch,
// (heads + 2 kv_heads) * dim] (bf16 or fp32, as out): the per-head norms of q and k (if given), RoPE on q and k
// over their first rotated dims (cos/sin [batch, rotated]), Qwen-1's logN factor on q (logn [batch] or null), the
// new k and v written to their cache slots, then each query against its
// sequence's keys kv_slots[b, tk - kv_lens[b] .. tk) (left-padded table) straight from the paged cache (rows of
// [slots, kv_heads]). Scores, softmax and sums run in fp32; out [batch, heads * dim]. Each (sequence, head) is
// computed alone, so nothing depends on the rest of the batch.
template <typename T, typename Cache>
void attend(const T* qkv, HeadNorm q_norm, HeadNorm k_norm, const T* cos, const T* sin, const T* logn,
            const int64_t* write_slots, const Cache& cache, const int64_t* kv_slots, const int64_t* kv_lens,
            int64_t batch, int64_t tk, int64_t heads, int64_t kv_heads, int64_t dim, int64_t rotated, float scale,
            T* out, int threads) {
    const int64_t group = heads / kv_heads, chunks = dim / 16;
    const int64_t stride = (heads + 2 * kv_heads) * dim;
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
            F16 key[kMaxHeadDim / 16], value[kMaxHeadDim / 16];
            rotated_head(qkv + b * stride + (heads + kvh) * dim, k_norm, cos + b * rotated, sin + b * rotated, dim,
                         rotated, key);
            const T* v_new = qkv + b * stride + (heads + kv_heads + kvh) * dim;
            for (int64_t c = 0; c < chunks; ++c) value[c] = load_elements(v_new + c * 16);
            cache.put_key(write_slots[b] * kv_heads + kvh, key, chunks);
            cache.put_value(write_slots[b] * kv_heads + kvh, value, chunks);
        }
    }
    // a few hundred KB of keys and values are not worth waking a second thread (it may be busy serving HTTP); more,
    // read from memory (the weights streamed through the caches since), are: SmolLM2-1.7B at 70 keys, 32 heads.
    // A job is a run of a sequence's query heads, token by token: the kv heads they read lie side by side in a cache
    // row, so a job reads each row's span in one piece (one head alone reads a few lines a row, rows a page or more
    // apart: SmolLM2-1.7B's attention at 16 sequences took 1.4x as long). Sequences are split into as few runs as
    // give every thread a job.
    const int64_t split = std::max((threads + batch - 1) / batch, (heads + kMaxHeadsPerJob - 1) / kMaxHeadsPerJob);
    const int64_t per_job = (heads + split - 1) / split, runs = (heads + per_job - 1) / per_job;
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (batch * heads * tk * dim >= 131072)
    for (int64_t job = 0; job < batch * runs; ++job) {
        thread_local std::vector<float> scores;
        const int64_t b = job / runs, first = job % runs * per_job, count = std::min(per_job, heads - first);
        const int64_t len = kv_lens[b], width = len + 16;
        const int64_t first_kv = first / group, span = (first + count - 1) / group - first_kv + 1;
        const int64_t* slots = kv_slots + b * tk + (tk - len);
        scores.resize(count * width);
        F16 query[kMaxHeadsPerJob][kMaxHeadDim / 16];
        float best[kMaxHeadsPerJob];
        float factor = scale;
        if (logn) factor *= to_float(logn[b]);
        for (int64_t i = 0; i < count; ++i) {
            rotated_head(qkv + b * stride + (first + i) * dim, q_norm, cos + b * rotated, sin + b * rotated, dim,
                         rotated, query[i]);
            for (int64_t c = 0; c < chunks; ++c) query[i][c] = simd::mul(query[i][c], simd::set1(factor));
            best[i] = -INFINITY;
        }
        for (int64_t t = 0; t < len; ++t) {
            if (t + kRowsAhead < len) cache.prefetch_keys(slots[t + kRowsAhead] * kv_heads + first_kv, span, chunks);
            for (int64_t i = 0; i < count; ++i) {
                const float score = cache.key_dot(slots[t] * kv_heads + (first + i) / group, query[i], chunks);
                scores[i * width + t] = score;
                best[i] = std::max(best[i], score);
            }
        }
        F16 acc[kMaxHeadsPerJob][kMaxHeadDim / 16];
        float inverse[kMaxHeadsPerJob];
        for (int64_t i = 0; i < count; ++i) {
            float* row = scores.data() + i * width;
            F16 total = simd::zero();
            int64_t t = 0;
            for (; t + 16 <= len; t += 16) {
                const F16 e = simd::exp_nonpositive(simd::sub(simd::load(row + t), simd::set1(best[i])));
                simd::store(row + t, e);
                total = simd::add(total, e);
            }
            if (t < len) {
                const F16 e = simd::exp_nonpositive(simd::sub(simd::load_first(row + t, len - t), simd::set1(best[i])));
                simd::store_first(row + t, e, len - t);
                total = simd::add(total, simd::first_lanes(e, len - t));
            }
            inverse[i] = 1.0f / simd::reduce_add(total);
            for (int64_t c = 0; c < chunks; ++c) acc[i][c] = simd::zero();
        }
        for (int64_t u = 0; u < len; ++u) {
            if (u + kRowsAhead < len) cache.prefetch_values(slots[u + kRowsAhead] * kv_heads + first_kv, span, chunks);
            for (int64_t i = 0; i < count; ++i)
                cache.add_value(slots[u] * kv_heads + (first + i) / group, scores[i * width + u], acc[i], chunks);
        }
        for (int64_t i = 0; i < count; ++i)
            for (int64_t c = 0; c < chunks; ++c)
                store_elements(out + (b * heads + first + i) * dim + c * 16, simd::mul(acc[i][c], simd::set1(inverse[i])));
    }
}

}  // namespace

extern "C" {

// fp32: activations and outputs are fp32 (else bf16); caches the same, or int8 when k_scale and v_scale (fp32, one
// per slot and kv head) are given. q_norm, k_norm: the per-head norms' weights (as the activations), or null.
void paged_decode_attention(const void* qkv, const void* q_norm, const void* k_norm, float norm_eps, const void* cos,
                            const void* sin, const void* logn, const int64_t* write_slots, void* k_cache,
                            void* v_cache, float* k_scale, float* v_scale, const int64_t* kv_slots,
                            const int64_t* kv_lens, int64_t batch, int64_t tk, int64_t heads, int64_t kv_heads,
                            int64_t dim, int64_t rotated, float scale, int fp32, void* out, int threads) {
    const Int8Cache int8{(int8_t*)k_cache, (int8_t*)v_cache, k_scale, v_scale};
    const HeadNorm qn{q_norm, norm_eps}, kn{k_norm, norm_eps};
    const auto run = [&](auto type, const auto& cache) {
        using T = decltype(type);
        attend((const T*)qkv, qn, kn, (const T*)cos, (const T*)sin, (const T*)logn, write_slots, cache, kv_slots,
               kv_lens, batch, tk, heads, kv_heads, dim, rotated, scale, (T*)out, threads);
    };
    if (fp32 && k_scale)
        run(float{}, int8);
    else if (fp32)
        run(float{}, PlainCache<float>{(float*)k_cache, (float*)v_cache});
    else if (k_scale)
        run(uint16_t{}, int8);
    else
        run(uint16_t{}, PlainCache<uint16_t>{(uint16_t*)k_cache, (uint16_t*)v_cache});
}


// y[rows, n] (fp32) = rmsnorm?(x[rows, k] (fp32)) @ W^T, W a Q8_0 matrix packed in tiles by q8head.py.
void q8_head(const int8_t* wq, const float* wd, int64_t n, int64_t k, const float* x, int64_t rows,
             const float* norm, float eps, float* y, int threads) {
    thread_local Activations16 act;
    quantize_rows_16bit(x, rows, k, norm, eps, act);
    const int64_t blocks = k / kBlock, tiles = n / kTile;
    const int16_t* xq = act.q.data();
    const float* xd = act.d.data();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
            const int count = (int)std::min<int64_t>(kMaxRows, rows - r0);
            kHeadFns[count - 1](wq + t * blocks * kBlock * kTile, wd + t * blocks * kTile, blocks, k, xq + r0 * k,
                                xd + r0 * blocks, y + r0 * n + t * kTile, n);
        }
    }
}

// y[rows, n] = rmsnorm?(x[rows, k]) @ W^T (+ bias, fp32), x and y bf16 (or fp32 with fp32 set), W packed in tiles
// by q4q8.py with one scale and offset per group of group_blocks blocks of 32 inputs; with norm (fp32 weight [k])
// each row is first scaled by 1 / sqrt(mean(x^2) + eps) and the weight, in fp32; gated: x is [rows, 2k], SwiGLU's
// gate and up halves (see quantize_rows); accumulate: y already holds rows the result is added to (one rounding);
// tile_rows: the amx build runs steps of at least this many rows on AMX tiles (the same bits).
void q4q8_linear(const uint8_t* wq, const float* wd, const float* wm, const float* bias, int64_t n, int64_t k,
                 int64_t group_blocks, int fp32, int64_t tile_rows, const void* x, int64_t rows, const float* norm,
                 float eps, int gated, int accumulate, void* y, int threads) {
    if (fp32)
        q4q8_rows(wq, wd, wm, bias, n, k, group_blocks, tile_rows, (const float*)x, rows, norm, eps, gated, accumulate,
                  (float*)y, threads);
    else
        q4q8_rows(wq, wd, wm, bias, n, k, group_blocks, tile_rows, (const uint16_t*)x, rows, norm, eps, gated,
                  accumulate, (uint16_t*)y, threads);
}

}
