// Matmuls over GGUF matrices as the file stores them (each output's row a run of blocks; the file memory-mapped, so
// nothing is repacked or copied): Q4_0, Q4_1, Q8_0, IQ4_NL (blocks of 32), the K-quants Q4_K, Q5_K, Q6_K and IQ4_XS
// (super-blocks of 256). Written once over simd.h's vectors; the AVX512 and AVX2 builds give the same bits.
//
// Activations are quantized per row the way llama.cpp's dots take them: to int8 per block of 32 with an fp32 scale
// (amax / 127) for the 32-blocks, per super-block of 256 for the K-quants, with the sums of every 16 codes for the
// offset terms. A block's integer dot is exact; its scale is applied in fp32, lane by lane, and a row's lanes are
// added once at its end, so a result never depends on the other rows of the call.
// Steps of several rows run other kernels over the same blocks: gguf_lanes.h (the vector builds) and gguf_tiles.h
// (the amx build).
//
// Per block, with dx the activation scale and q the activation codes:
//   Q4_0  d (c - 8) . q dx          Q4_1  (d c + m) . q dx              Q8_0  d c . q dx
//   Q4_K  sum_j (d s_j c - dmin m_j) . q dx, over 8 sub-blocks of 32 with 6-bit s_j, m_j
//   Q5_K  as Q4_K with 5-bit codes  Q6_K  sum_j d s_j (c - 32) . q dx, over 16 sub-blocks of 16 with int8 s_j
//   IQ4_NL  d v(c) . q dx, v the 16 non-uniform values of kIQ4Values
//   IQ4_XS  sum_j d (s_j - 32) v(c) . q dx, over 8 sub-blocks of 32 with 6-bit s_j
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

enum Type : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23 };
// ggml's type numbers

// The values IQ4_NL and IQ4_XS codes stand for (ggml's kvalues_iq4nl).
alignas(16) constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// A byte's four 2-bit fields, one a byte (entry b: b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6): IQ4_XS's scale tops.
constexpr std::array<uint32_t, 256> kTwoBitFields = [] {
    std::array<uint32_t, 256> fields{};
    for (uint32_t b = 0; b < 256; ++b) fields[b] = (b & 3) | ((b >> 2) & 3) << 8 | ((b >> 4) & 3) << 16 | (b >> 6) << 24;
    return fields;
}();

constexpr int kMaxRows = 8;  // activation rows that share one decoded weight block
constexpr int64_t kTile = 16;  // output rows a thread takes at a time

// Weights stream from memory once a step, and one core keeps more of them in flight reading several runs of a
// matrix's rows side by side than one run (plain reads on a 2-core Xeon slice: 16.5 GB/s as one stream a core, 19.5
// as four). The row kernel reads kRuns(R) output rows at once, block by block in turn, where its R activation rows
// leave it memory-bound (a 1.7B Q4_K_M model's linears at one row: 77 -> 54-62 ms a step; at three rows the kernel's
// arithmetic bounds it and more runs gain nothing).
constexpr int kRuns(int rows) { return rows <= 2 ? 4 : 1; }
constexpr int kMostRuns = kRuns(1);

int64_t block_size(int64_t type) { return type == Q4_0 || type == Q4_1 || type == Q8_0 || type == IQ4_NL ? 32 : 256; }

int64_t block_bytes(int64_t type) {
    switch (type) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q8_0: return 34;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case IQ4_NL: return 18;
        case IQ4_XS: return 136;
        default: return 210;  // Q6_K
    }
}

float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);  // exact
}

uint16_t float_to_bf16(float x) {  // round to nearest even, as vcvtneps2bf16 does for numbers
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Rows quantized to int8 per block (32 or 256 inputs): codes, one scale a block, and the sum of every 16 codes.
struct Quantized {
    int64_t block = 0;
    std::vector<int8_t> q;       // [rows, k]
    std::vector<float> d;        // [rows, k / block]
    std::vector<int16_t> sums;   // [rows, k / 16]
    std::vector<int16_t> sums32; // [rows, k / 32]
};

// `gated`: each row of x holds 2k values, a gate and an up half, and the inputs are SiLU(gate) * up in fp32 (the
// SwiGLU activation before an MLP's down projection); otherwise k inputs, RMSNorm-ed first where `norm` is given.
template <typename T>
void quantize(const T* x, int64_t rows, int64_t k, const float* norm, float eps, bool gated, int64_t block,
              Quantized& out) {
    const int64_t blocks = k / block;
    out.block = block;
    out.q.resize(rows * k);
    out.d.assign(rows * blocks + 1, 0.0f);  // one past the end: a last odd block's pair reads it (at weight 0)
    out.sums.resize(rows * k / 16);
    out.sums32.resize(rows * k / 32);
    std::vector<float> v(k);
    for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * (gated ? 2 * k : k);
        const float inverse_norm =
            norm ? simd::inverse_rms([row](int64_t i) { return simd::load_elements(row + i); }, k, eps) : 1.0f;
        for (int64_t i = 0; i < k; i += 16) {
            simd::F16 lanes = simd::load_elements(row + i);
            if (gated) lanes = simd::mul(simd::silu(lanes), simd::load_elements(row + k + i));
            if (norm) lanes = simd::mul(simd::mul(lanes, simd::set1(inverse_norm)), simd::load(norm + i));
            simd::store(v.data() + i, lanes);
        }
        for (int64_t b = 0; b < blocks; ++b) {
            const float* values = v.data() + b * block;
            simd::F16 amax = simd::zero();
            for (int64_t i = 0; i < block; i += 16) amax = simd::max(amax, simd::abs(simd::load(values + i)));
            const float largest = simd::reduce_max(amax);
            const float scale = largest / 127.0f, inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
            out.d[r * blocks + b] = scale;
            int8_t* codes = out.q.data() + r * k + b * block;
            for (int64_t i = 0; i < block; i += 16) {
                simd::store_int8(codes + i, simd::round_to_int(simd::mul(simd::load(values + i), simd::set1(inverse))));
                int sum = 0;
                for (int j = 0; j < 16; ++j) sum += codes[i + j];
                out.sums[(r * k + b * block + i) / 16] = (int16_t)sum;
            }
        }
        for (int64_t i = 0; i < k / 32; ++i) {
            const int16_t* pair = out.sums.data() + r * k / 16 + 2 * i;
            out.sums32[r * k / 32 + i] = (int16_t)(pair[0] + pair[1]);
        }
    }
}

// R activation rows of a Quantized, resolved once: their codes, block scales and code sums.
template <int R>
struct Rows {
    const int8_t* q[R];
    const float* d[R];
    const int16_t* sums[R];    // per 16 codes
    const int16_t* sums32[R];  // per 32 codes

    Rows(const Quantized& x, int64_t k, int64_t first) {
        for (int r = 0; r < R; ++r) {
            q[r] = x.q.data() + (first + r) * k;
            d[r] = x.d.data() + (first + r) * (k / x.block);
            sums[r] = x.sums.data() + (first + r) * (k / 16);
            sums32[r] = x.sums32.data() + (first + r) * (k / 32);
        }
    }
};

// Every kernel below computes `count` groups of N output rows against R activation rows: group g's row i at
// w[i] + g * row_bytes, into y[(g * N + i) * R + r], a group's rows read block by block in turn. Per output row,
// acc[r] gathers lane-wise products and offset[r] (4 lanes) the per-block terms subtracted at the end; a row's sums
// never depend on the other rows.
template <int R>
struct Sums {
    simd::F16 acc[R];
    __m128 offset[R];

    Sums() {
        for (int r = 0; r < R; ++r) {
            acc[r] = simd::zero();
            offset[r] = _mm_setzero_ps();
        }
    }
    void finish(float* y) const {
        for (int r = 0; r < R; ++r) y[r] = simd::reduce_add(acc[r]) - simd::reduce_add4(offset[r]);
    }
};

// Blocks of 32, two at a time (a last odd block pairs with itself at scale 0): signed weights c (Q8_0, Q4_0 - 8,
// IQ4_NL's values) as |c| times sign-carrying activations; Q4_1's unsigned codes directly, its offset from the code
// sums.
template <int R, int N>
void dot_blocks32(const uint8_t* const* w, int64_t row_bytes, int64_t count, int64_t type, int64_t k,
                  const Rows<R>& x, float* y) {
    const int64_t blocks = k / 32, bytes = block_bytes(type);
    const bool is_signed = type != Q4_1;
    for (int64_t g = 0; g < count; ++g, y += N * R) {
        Sums<R> row_sums[N];
        for (int64_t b = 0; b < blocks; b += 2) {
            for (int i = 0; i < N; ++i) {
                Sums<R>& sums = row_sums[i];
                const bool pair = b + 1 < blocks;
                const uint8_t* first = w[i] + g * row_bytes + b * bytes;
                const uint8_t* second = pair ? first + bytes : first;
                simd::prefetch_ahead(first, 2 * bytes);
                simd::Bytes codes;
                if (type == Q8_0) {
                    codes = simd::bytes_load2(first + 2, second + 2);
                } else {
                    const int64_t at = type == Q4_1 ? 4 : 2;
                    codes = simd::nibble_blocks(first + at, second + at);
                    if (type == Q4_0) codes = simd::bytes_sub(codes, simd::bytes_set1(8));
                    if (type == IQ4_NL) codes = simd::bytes_lookup(kIQ4Values, codes);
                }
                const simd::Bytes magnitude = is_signed ? simd::bytes_abs(codes) : codes;
                const float d0 = half_to_float(first), d1 = pair ? half_to_float(second) : 0.0f;
                const simd::F16 weight_scales = simd::halves(d0, d1);
                for (int r = 0; r < R; ++r) {
                    const int8_t* q = x.q[r] + b * 32;
                    simd::Bytes activations = pair ? simd::bytes_load(q) : simd::bytes_dup(q);
                    if (is_signed) activations = simd::bytes_sign(activations, codes);
                    const simd::I16 dots = simd::dot_bytes(simd::izero(), magnitude, activations);
                    const float* scales = x.d[r] + b;
                    const simd::F16 factors = simd::mul(weight_scales, simd::halves(scales));
                    sums.acc[r] = simd::fmadd(simd::to_float(dots), factors, sums.acc[r]);
                    if (type == Q4_1) {  // minus: the offset term adds here
                        const int16_t* s = x.sums32[r] + b;
                        const float m0 = half_to_float(first + 2) * scales[0];
                        const float m1 = pair ? half_to_float(second + 2) * scales[1] : 0.0f;
                        const __m128 terms =
                            _mm_mul_ps(_mm_setr_ps(m0, m1, 0.0f, 0.0f), _mm_setr_ps(s[0], pair ? s[1] : 0, 0, 0));
                        sums.offset[r] = _mm_sub_ps(sums.offset[r], terms);
                    }
                }
            }
        }
        for (int i = 0; i < N; ++i) row_sums[i].finish(y + i * R);
    }
}

// Q4_K/Q5_K's 12 bytes of 6-bit scales and mins, as llama.cpp packs them: sub-blocks 0-3 in the low 6 bits of bytes
// 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11 with their top 2 bits in the tops of bytes 0-7.
// Returned as 16 bytes: the 8 scales, then the 8 mins.
// Reads 16 bytes at p (the 4 after the 12 lie inside the block).
__m128i scales_and_mins(const uint8_t* p) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)p);  // 32-bit words w0, w1, w2 (and one unused)
    // scales 0-3 = w0 & low6, scales 4-7 = w2 & low4, mins 0-3 = w1 & low6, mins 4-7 = (w2 >> 4) & low4 ...
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(raw, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    // ... with the top 2 bits of w0's bytes (scales 4-7) and of w1's (mins 4-7) above the low 4
    const __m128i tops = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(raw, _MM_SHUFFLE(1, 1, 0, 0)), 6),
                                       _mm_setr_epi32(0, 0x03030303, 0, 0x03030303));
    return _mm_or_si128(low, _mm_slli_epi32(tops, 4));
}

// A K-quant super-block decoded: its 256 codes in 4 steps of 64 bytes with their sub-block factors, the scale of
// the integer dots (d), and the offset term: `offset_scale` times the int16 `offset_weights` dotted with the
// activations' 16 code sums (Q4_K/Q5_K: each min twice, one per half of its sub-block of 32; Q6_K: 32 x its scales).
struct SuperBlock {
    simd::Bytes codes[4];
    simd::Scales factors[4];
    float d, offset_scale;
    __m256i offset_weights;
};

// Q4_K and Q5_K: 4 steps of 64 inputs = sub-blocks 2j (low nibbles of 32 bytes) and 2j + 1 (high nibbles).
template <int64_t type>
__attribute__((always_inline)) inline SuperBlock decode_q4k_q5k(const uint8_t* block) {
    SuperBlock s;
    s.d = half_to_float(block);
    s.offset_scale = half_to_float(block + 2);
    const __m128i packed = scales_and_mins(block + 4);
    const __m128i scales = _mm_cvtepu8_epi16(packed), mins = _mm_srli_si128(packed, 8);
    s.offset_weights = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
    const uint8_t* qs = block + (type == Q4_K ? 16 : 48);
    simd::nibble_pairs(qs, s.codes[0], s.codes[1]);
    simd::nibble_pairs(qs + 64, s.codes[2], s.codes[3]);
    if constexpr (type == Q5_K) {  // the fifth bit of sub-block i: bit i of the 32 bytes at 16
        for (int j = 0; j < 4; ++j) {
            const simd::Bytes high = simd::bytes_shr(simd::bytes_dup(block + 16), 2 * j, 2 * j + 1);
            s.codes[j] = simd::bytes_or(s.codes[j], simd::bytes_shl4(simd::bytes_and(high, simd::bytes_set1(1))));
        }
    }
    s.factors[0] = simd::spread<0, 0, 1, 1>(scales);
    s.factors[1] = simd::spread<2, 2, 3, 3>(scales);
    s.factors[2] = simd::spread<4, 4, 5, 5>(scales);
    s.factors[3] = simd::spread<6, 6, 7, 7>(scales);
    return s;
}

// Q6_K: two halves of 128 inputs, each 64 bytes of low nibbles (inputs 0-63, then 64-127 in the high nibbles) and
// 32 bytes of 2-bit tops (bits 0-1: inputs 0-31, 2-3: 32-63, 4-5: 64-95, 6-7: 96-127); codes are c - 32.
__attribute__((always_inline)) inline SuperBlock decode_q6k(const uint8_t* block) {
    SuperBlock s;
    s.d = half_to_float(block + 208);
    s.offset_scale = 32.0f * s.d;
    s.offset_weights = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(block + 192)));  // 16 int8 scales
    const __m128i halves[2] = {_mm256_castsi256_si128(s.offset_weights), _mm256_extracti128_si256(s.offset_weights, 1)};
    for (int h = 0; h < 2; ++h) {
        const simd::Bytes low = simd::bytes_load(block + 64 * h);
        const simd::Bytes tops = simd::bytes_dup(block + 128 + 32 * h);
        for (int c = 0; c < 2; ++c) {
            const simd::Bytes nibbles = simd::bytes_and(c == 0 ? low : simd::bytes_shr(low, 4, 4), simd::bytes_set1(0x0F));
            const simd::Bytes top = simd::bytes_and(simd::bytes_shr(tops, 4 * c, 4 * c + 2), simd::bytes_set1(3));
            s.codes[2 * h + c] = simd::bytes_or(nibbles, simd::bytes_shl4(top));
        }
        s.factors[2 * h] = simd::spread<0, 1, 2, 3>(halves[h]);
        s.factors[2 * h + 1] = simd::spread<4, 5, 6, 7>(halves[h]);
    }
    return s;
}

// IQ4_XS: 8 sub-blocks of 32 (16 bytes of nibbles each, low nibbles inputs 0-15, high 16-31) with 6-bit scales s_j
// (low 4 bits in the nibbles of 4 bytes at 4, top 2 bits in the 16 bits at 2), factors s_j - 32; the codes are
// signed values (kIQ4Values), no offset term.
__attribute__((always_inline)) inline SuperBlock decode_iq4_xs(const uint8_t* block) {
    SuperBlock s;
    s.d = half_to_float(block);
    s.offset_scale = 0.0f;
    s.offset_weights = _mm256_setzero_si256();
    uint32_t low_bits;
    std::memcpy(&low_bits, block + 4, 4);
    const __m128i packed = _mm_cvtsi32_si128((int)low_bits), mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_unpacklo_epi8(_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
    const __m128i tops = _mm_setr_epi32((int)kTwoBitFields[block[2]], (int)kTwoBitFields[block[3]], 0, 0);
    const __m128i eight = _mm_sub_epi16(_mm_cvtepu8_epi16(_mm_or_si128(low, _mm_slli_epi16(tops, 4))), _mm_set1_epi16(32));
    simd::nibble_block_pairs(block + 8, s.codes[0], s.codes[1]);
    simd::nibble_block_pairs(block + 72, s.codes[2], s.codes[3]);
    for (int j = 0; j < 4; ++j) s.codes[j] = simd::bytes_lookup(kIQ4Values, s.codes[j]);
    s.factors[0] = simd::spread<0, 0, 1, 1>(eight);
    s.factors[1] = simd::spread<2, 2, 3, 3>(eight);
    s.factors[2] = simd::spread<4, 4, 5, 5>(eight);
    s.factors[3] = simd::spread<6, 6, 7, 7>(eight);
    return s;
}

// The K-quants: per super-block, the integer dots of its 4 steps scaled by d x the activation scale, less the
// offset term (IQ4_XS's signed values as |v| times sign-carrying activations).
template <int R, int N, int64_t type>
void dot_super_blocks(const uint8_t* const* w, int64_t row_bytes, int64_t count, int64_t k, const Rows<R>& x,
                      float* y) {
    const int64_t blocks = k / 256, bytes = block_bytes(type);
    for (int64_t g = 0; g < count; ++g, y += N * R) {
        Sums<R> row_sums[N];
        for (int64_t b = 0; b < blocks; ++b) {
            for (int i = 0; i < N; ++i) {
                Sums<R>& sums = row_sums[i];
                const uint8_t* block = w[i] + g * row_bytes + b * bytes;
                simd::prefetch_ahead(block, bytes);
                SuperBlock s;
                if constexpr (type == Q6_K) {
                    s = decode_q6k(block);
                } else if constexpr (type == IQ4_XS) {
                    s = decode_iq4_xs(block);
                } else {
                    s = decode_q4k_q5k<type>(block);
                }
                simd::Bytes magnitudes[4];
                for (int j = 0; j < 4; ++j) magnitudes[j] = type == IQ4_XS ? simd::bytes_abs(s.codes[j]) : s.codes[j];
                for (int r = 0; r < R; ++r) {
                    const int8_t* q = x.q[r] + b * 256;
                    simd::I16 dots = simd::izero();
                    for (int j = 0; j < 4; ++j) {
                        simd::Bytes activations = simd::bytes_load(q + 64 * j);
                        if constexpr (type == IQ4_XS) activations = simd::bytes_sign(activations, s.codes[j]);
                        dots = simd::dot_bytes(dots, magnitudes[j], activations, s.factors[j]);
                    }
                    const float dx = x.d[r][b];
                    sums.acc[r] = simd::fmadd(simd::to_float(dots), simd::set1(s.d * dx), sums.acc[r]);
                    if constexpr (type == IQ4_XS) continue;
                    const __m256i code_sums = _mm256_loadu_si256((const __m256i*)(x.sums[r] + 16 * b));
                    const __m128i offsets = simd::madd16(s.offset_weights, code_sums);
                    sums.offset[r] =
                        _mm_fmadd_ps(_mm_cvtepi32_ps(offsets), _mm_set1_ps(s.offset_scale * dx), sums.offset[r]);
                }
            }
        }
        for (int i = 0; i < N; ++i) row_sums[i].finish(y + i * R);
    }
}

// Outputs [count][N][R] of weight rows of `type` (see above) against activation rows first .. first + R - 1.
template <int R, int N>
void dot(const uint8_t* const* w, int64_t row_bytes, int64_t count, int64_t type, int64_t k,
         const Quantized& quantized, int64_t first, float* y) {
    const Rows<R> x(quantized, k, first);
    if (type == Q4_K) {
        dot_super_blocks<R, N, Q4_K>(w, row_bytes, count, k, x, y);
    } else if (type == Q5_K) {
        dot_super_blocks<R, N, Q5_K>(w, row_bytes, count, k, x, y);
    } else if (type == Q6_K) {
        dot_super_blocks<R, N, Q6_K>(w, row_bytes, count, k, x, y);
    } else if (type == IQ4_XS) {
        dot_super_blocks<R, N, IQ4_XS>(w, row_bytes, count, k, x, y);
    } else {
        dot_blocks32<R, N>(w, row_bytes, count, type, k, x, y);
    }
}

// `runs` is 1 or kRuns(R).
template <int R>
void dot_runs(int runs, const uint8_t* const* w, int64_t row_bytes, int64_t count, int64_t type, int64_t k,
              const Quantized& quantized, int64_t first, float* y) {
    if (runs == 1) {
        dot<R, 1>(w, row_bytes, count, type, k, quantized, first, y);
    } else {
        dot<R, kRuns(R)>(w, row_bytes, count, type, k, quantized, first, y);
    }
}

void dot_some_rows(int rows, int runs, const uint8_t* const* w, int64_t row_bytes, int64_t count, int64_t type,
                   int64_t k, const Quantized& quantized, int64_t first, float* y) {
    switch (rows) {
        case 1: dot_runs<1>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        case 2: dot_runs<2>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        case 3: dot_runs<3>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        case 4: dot_runs<4>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        case 5: dot_runs<5>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        case 6: dot_runs<6>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        case 7: dot_runs<7>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
        default: dot_runs<8>(runs, w, row_bytes, count, type, k, quantized, first, y); break;
    }
}

// One row of `k` inputs dequantized to fp32 (the numbers llama.cpp's dequantize_row_* gives).
void dequantize_row(const uint8_t* row, int64_t type, int64_t k, float* y) {
    const int64_t size = block_size(type), bytes = block_bytes(type), blocks = k / size;
    for (int64_t b = 0; b < blocks; ++b, y += size) {
        const uint8_t* block = row + b * bytes;
        if (type == Q8_0 || type == Q4_0 || type == Q4_1 || type == IQ4_NL) {
            const float d = half_to_float(block);
            for (int i = 0; i < 32; ++i) {
                if (type == Q8_0) {
                    y[i] = d * (float)(int8_t)block[2 + i];
                } else {
                    const uint8_t* qs = block + (type == Q4_1 ? 4 : 2);
                    const int code = i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4;
                    y[i] = type == Q4_1    ? d * (float)code + half_to_float(block + 2)
                           : type == Q4_0 ? d * (float)(code - 8)
                                          : d * (float)kIQ4Values[code];
                }
            }
        } else if (type == IQ4_XS) {
            const float d = half_to_float(block);
            uint16_t high;
            std::memcpy(&high, block + 2, 2);
            for (int j = 0; j < 8; ++j) {
                const int scale = (((block[4 + j / 2] >> (4 * (j % 2))) & 0x0F) | (((high >> (2 * j)) & 3) << 4)) - 32;
                const float dl = d * (float)scale;
                for (int i = 0; i < 32; ++i) {
                    const uint8_t byte = block[8 + 16 * j + i % 16];
                    y[32 * j + i] = dl * (float)kIQ4Values[i < 16 ? byte & 0x0F : byte >> 4];
                }
            }
        } else {  // the K-quants' codes as the products decode them, in input order
            const SuperBlock s = type == Q6_K ? decode_q6k(block) : type == Q5_K ? decode_q4k_q5k<Q5_K>(block)
                                                                                  : decode_q4k_q5k<Q4_K>(block);
            alignas(64) int8_t codes[256];  // below 64
            for (int j = 0; j < 4; ++j) simd::bytes_store(codes + 64 * j, s.codes[j]);
            if (type == Q6_K) {  // d s_j (c - 32) over sub-blocks of 16, s_j int8
                const int8_t* scales = (const int8_t*)(block + 192);
                for (int j = 0; j < 16; ++j) {
                    const simd::F16 centered = simd::sub(simd::load_int8(codes + 16 * j), simd::set1(32.0f));
                    simd::store(y + 16 * j, simd::mul(simd::set1(s.d * (float)scales[j]), centered));
                }
            } else {  // d s_j c - dmin m_j over sub-blocks of 32 (d s_j c exact)
                uint8_t scale_min[16];
                _mm_storeu_si128((__m128i*)scale_min, scales_and_mins(block + 4));
                for (int i = 0; i < 256; i += 16) {
                    const simd::F16 scaled = simd::mul(simd::set1(s.d * (float)scale_min[i / 32]), simd::load_int8(codes + i));
                    simd::store(y + i, simd::sub(scaled, simd::set1(s.offset_scale * (float)scale_min[8 + i / 32])));
                }
            }
        }
    }
}

// One activation row's 16 outputs side by side at out[at..at + 15], as gguf_linear finishes them: plus bias (its 16
// entries, or none), plus what out holds (accumulate), rounded once to out's dtype.
void store_outputs(simd::F16 value, const float* bias, bool accumulate, bool out_fp32, void* out, int64_t at) {
    if (bias) value = simd::add(value, simd::load(bias));
    if (out_fp32) {
        float* target = (float*)out + at;
        if (accumulate) value = simd::add(value, simd::load(target));
        simd::store(target, value);
    } else {
        uint16_t* target = (uint16_t*)out + at;
        if (accumulate) value = simd::add(value, simd::load_bf16(target));
        simd::store_bf16(target, value);
    }
}

#include "gguf_lanes.h"

}  // namespace

#if defined(__AMX_INT8__)
#include "amx.h"
namespace {
#include "gguf_tiles.h"
}  // namespace
#endif

extern "C" {

// One matrix of a fused product: `rows` outputs of GGML type `type` at `data` (each row k / block_size blocks),
// written to output columns `column + i`, or `index[i]` when index is not null (llama.cpp's permuted q/k rows).
struct GGUFMatrix {
    const uint8_t* data;
    int64_t type;
    int64_t rows;
    int64_t column;
    const int32_t* index;
};

// out [m, n] = norm?(x) [m, k] @ W^T (+ bias [n]) for the matrices stacked along the outputs (n: their rows in all).
// x: bf16 (in_fp32 0) or fp32; out: bf16 (out_fp32 0) or fp32; norm: fp32 RMSNorm weight [k], or null; gated: x is
// [m, 2k], SwiGLU's gate and up halves (see quantize); accumulate: out already holds rows the result is added to (a
// residual, rounded once with the sum); tile_rows: the amx build runs steps of at least this many rows on tiles;
// lane_rows: the others run steps of at least this many rows of Q4_K, Q5_K, Q6_K and Q8_0 (k a multiple of 256) on
// the lanes (gguf_lanes.h).
void gguf_linear(const GGUFMatrix* matrices, int64_t count, int64_t n, int64_t k, int in_fp32, const float* bias,
                 int out_fp32, int64_t tile_rows, int64_t lane_rows, const void* x, int64_t m, const float* norm,
                 float eps, int gated, int accumulate, void* out, int threads) {
    Quantized blocks32, blocks256;
    bool need32 = false, need256 = false;
    for (int64_t i = 0; i < count; ++i) (block_size(matrices[i].type) == 256 ? need256 : need32) = true;
    for (auto [need, size, target] : {std::tuple{need32, 32, &blocks32}, std::tuple{need256, 256, &blocks256}}) {
        if (!need) continue;
        if (in_fp32) {
            quantize((const float*)x, m, k, norm, eps, gated, size, *target);
        } else {
            quantize((const uint16_t*)x, m, k, norm, eps, gated, size, *target);
        }
    }
    // the path of a matrix's products: the amx build's tiles, the lanes, or the row kernel
#if defined(__AMX_INT8__)
    const bool use_tiles = m >= tile_rows && amx::enabled();
    auto on_tiles = [&](const GGUFMatrix& matrix) { return use_tiles && tiles::supports(matrix.type, k); };
#else
    (void)tile_rows;
    auto on_tiles = [](const GGUFMatrix&) { return false; };
#endif
    auto on_lanes = [&](const GGUFMatrix& matrix) {
        return !on_tiles(matrix) && m >= lane_rows && lanes::supports(matrix.type, k);
    };
    // work items: tiles of up to kTile outputs of one matrix (the lanes': lane_groups of 16), in order; threads take
    // contiguous ranges of them
    const int lane_groups = lanes::groups(m);
    const int64_t lane_tile = lanes::kOutputs * lane_groups;
    struct Tile { int64_t matrix, row, count; };
    std::vector<Tile> tiles;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t size = on_lanes(matrices[i]) ? lane_tile : kTile;
        for (int64_t row = 0; row < matrices[i].rows; row += size)
            tiles.push_back({i, row, std::min<int64_t>(size, matrices[i].rows - row)});
    }
    // y[i][r]: output row tile.row + i of activation row r0 + r, finished (bias, residual, rounding) into out
    auto finish = [&](const Tile& tile, const GGUFMatrix& matrix, int64_t r0, int rows, auto y) {
        for (int64_t i = 0; i < tile.count; ++i) {
            const int64_t row = tile.row + i;
            const int64_t column = matrix.index ? matrix.index[row] : matrix.column + row;
            for (int r = 0; r < rows; ++r) {
                float value = y(i, r);
                if (bias) value += bias[column];
                const int64_t at = (r0 + r) * n + column;
                if (accumulate) value += out_fp32 ? ((float*)out)[at] : simd::to_float(((uint16_t*)out)[at]);
                if (out_fp32) {
                    ((float*)out)[at] = value;
                } else {
                    ((uint16_t*)out)[at] = float_to_bf16(value);
                }
            }
        }
    };
#if defined(__AMX_INT8__)
    // the tile path: activations interleaved once, per 16 rows, for the block sizes its matrices read
    std::vector<tiles::Columns> columns32, columns256;
    bool tiles32 = false, tiles256 = false;
    for (int64_t i = 0; i < count; ++i)
        if (on_tiles(matrices[i])) (block_size(matrices[i].type) == 256 ? tiles256 : tiles32) = true;
    for (int64_t r0 = 0; r0 < m && (tiles32 || tiles256); r0 += tiles::kRows) {
        const int64_t rows = std::min<int64_t>(tiles::kRows, m - r0);
        if (tiles32) columns32.emplace_back(blocks32, k, r0, rows);
        if (tiles256) columns256.emplace_back(blocks256, k, r0, rows);
    }
#endif
    // the row kernel over `span` (consecutive output rows of one matrix) as `runs` runs of its rows side by side, a
    // visit reading rows v .. v + count - 1 of each (one row of several runs, up to kTile of one run; a run already
    // done reads the span's first row again, its outputs dropped)
    const int runs = m <= kMaxRows ? kRuns((int)m) : 1;
    const int64_t visit_rows = runs == 1 ? kTile : 1;
    auto on_rows = [&](const Tile& span) {
        const GGUFMatrix& matrix = matrices[span.matrix];
        const int64_t row_bytes = k / block_size(matrix.type) * block_bytes(matrix.type);
        const Quantized& quantized = block_size(matrix.type) == 256 ? blocks256 : blocks32;
        int64_t start[kMostRuns + 1];
        for (int i = 0; i <= runs; ++i) start[i] = span.count * i / runs;
        const int64_t longest = (span.count + runs - 1) / runs;
        float results[kTile * kMaxRows];
        for (int64_t v = 0; v < longest; v += visit_rows) {
            const int64_t count = std::min(visit_rows, longest - v);
            const uint8_t* w[kMostRuns];
            for (int i = 0; i < runs; ++i)
                w[i] = matrix.data + (span.row + (start[i] + v < start[i + 1] ? start[i] + v : 0)) * row_bytes;
            for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
                const int rows = (int)std::min<int64_t>(kMaxRows, m - r0);
                dot_some_rows(rows, runs, w, row_bytes, count, matrix.type, k, quantized, r0, results);
                for (int64_t g = 0; g < count; ++g) {
                    for (int i = 0; i < runs; ++i) {
                        if (start[i] + v + g >= start[i + 1]) continue;
                        finish(Tile{span.matrix, span.row + start[i] + v + g, 1}, matrix, r0, rows,
                               [&](int64_t, int r) { return results[(g * runs + i) * rows + r]; });
                    }
                }
            }
        }
    };
#pragma omp parallel num_threads(threads)
    {
    // each thread a contiguous range of the tiles; its row-kernel tiles of a matrix joined into one span, run once
    // the span ends
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    const size_t first = tiles.size() * thread / team, last = tiles.size() * (thread + 1) / team;
    Tile span{0, 0, 0};
    for (size_t t = first; t < last; ++t) {
        const Tile& tile = tiles[t];
        const GGUFMatrix& matrix = matrices[tile.matrix];
        const int64_t row_bytes = k / block_size(matrix.type) * block_bytes(matrix.type);
        const uint8_t* w = matrix.data + tile.row * row_bytes;
#if defined(__AMX_INT8__)
        if (on_tiles(matrix)) {
            float results[tiles::kRows][tiles::kRows];
            for (size_t chunk = 0; chunk * tiles::kRows < (size_t)m; ++chunk) {
                const int64_t r0 = chunk * tiles::kRows;
                const auto& x = block_size(matrix.type) == 256 ? columns256[chunk] : columns32[chunk];
                tiles::dot_type(matrix.type, w, row_bytes, tile.count, k, x, results);
                const int rows = (int)std::min<int64_t>(tiles::kRows, m - r0);
                if (tile.count == tiles::kRows && matrix.index == nullptr) {  // 16 outputs side by side
                    tiles::finish(results, rows, bias ? bias + matrix.column + tile.row : nullptr, accumulate, out_fp32,
                                  out, r0 * n + matrix.column + tile.row, n);
                } else {
                    finish(tile, matrix, r0, rows, [&](int64_t i, int r) { return results[i][r]; });
                }
            }
            continue;
        }
#endif
        if (on_lanes(matrix)) {
            const Quantized& quantized = block_size(matrix.type) == 256 ? blocks256 : blocks32;
            alignas(64) float y[lanes::kChunk][lanes::kTileOutputs];
            const uint8_t* next = w + tile.count * row_bytes;
            for (int64_t r0 = 0; r0 < m; r0 += lanes::kChunk) {
                const int rows = (int)std::min<int64_t>(lanes::kChunk, m - r0);
                lanes::dot_type(matrix.type, lane_groups, w, row_bytes, (int)tile.count, k, quantized, r0, rows, next,
                                y);
                if (tile.count == lane_tile && matrix.index == nullptr) {  // groups of 16 outputs side by side
                    for (int g = 0; g < lane_groups; ++g) {
                        const int64_t column = matrix.column + tile.row + lanes::kOutputs * g;
                        for (int r = 0; r < rows; ++r)
                            store_outputs(simd::load(y[r] + lanes::kOutputs * g), bias ? bias + column : nullptr,
                                          accumulate, out_fp32, out, (r0 + r) * n + column);
                    }
                } else {
                    finish(tile, matrix, r0, rows, [&](int64_t i, int r) { return y[r][i]; });
                }
            }
            continue;
        }
        if (span.count > 0 && span.matrix == tile.matrix && span.row + span.count == tile.row) {
            span.count += tile.count;
            continue;
        }
        if (span.count > 0) on_rows(span);
        span = tile;
    }
    if (span.count > 0) on_rows(span);
#if defined(__AMX_INT8__)
    amx::release();
#endif
    }
}

#if defined(__AMX_INT8__)
// Whether this process may use the tile registers: the amx build runs only where it may.
int tiles_enabled() { return amx::enabled(); }
#endif

// Rows `ids` of one matrix, dequantized to fp32 (out [count, k]): embedding lookups from a quantized table.
void gguf_rows(const uint8_t* data, int64_t type, int64_t k, const int64_t* ids, int64_t count, float* out) {
    const int64_t row_bytes = k / block_size(type) * block_bytes(type);
    for (int64_t t = 0; t < count; ++t) dequantize_row(data + ids[t] * row_bytes, type, k, out + t * k);
}

// A whole matrix dequantized to bf16 (out [rows, k]), row i written to out row index[i] (or i): the weight of a
// many-row step's dense matmul.
void gguf_dequantize(const uint8_t* data, int64_t type, int64_t k, int64_t rows, const int32_t* index, uint16_t* out,
                     int threads) {
    const int64_t row_bytes = k / block_size(type) * block_bytes(type);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> values(k);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            dequantize_row(data + i * row_bytes, type, k, values.data());
            uint16_t* y = out + (index ? index[i] : i) * k;
            for (int64_t j = 0; j < k; j += 16) simd::store_bf16(y + j, simd::load(values.data() + j));
        }
    }
}

}  // extern "C"
