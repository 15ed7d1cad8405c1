// 16-lane vectors for quant_matmul.cpp and gguf_matmul.cpp, on AVX512 (one zmm) or AVX2 (two ymm), chosen by the compiler flags.
//
// Every operation gives the same bits on both: lane-wise arithmetic is the same IEEE operation (FMA on both),
// integer dots are exact, rounding is to nearest even, and reductions add in the same tree order
// (256-bit halves, then 128-bit halves, then pairs), so the AVX2 build reproduces the AVX512 build exactly.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace simd {

#if defined(__AVX512F__)

struct F16 { __m512 v; };   // 16 fp32 lanes
struct I16 { __m512i v; };  // 16 int32 lanes

inline F16 zero() { return {_mm512_setzero_ps()}; }
inline F16 set1(float x) { return {_mm512_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline F16 add(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 sub(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 mul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 fmadd(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 div(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F16 abs(F16 a) { return {_mm512_abs_ps(a.v)}; }
inline F16 select_nonnegative(F16 g, F16 a, F16 b) {  // a where g >= 0, else b
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(g.v, _mm512_setzero_ps(), _CMP_GE_OQ), b.v, a.v)};
}
inline F16 to_float(I16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline I16 round_to_int(F16 a) { return {_mm512_cvt_roundps_epi32(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline F16 round(F16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline F16 scale_by_power_of_two(F16 a, F16 n) { return {_mm512_scalef_ps(a.v, n.v)}; }  // a * 2^n, n >= -126
inline float reduce_add(F16 a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(F16 a) { return _mm512_reduce_max_ps(a.v); }
inline F16 first_lanes(F16 a, int64_t count) { return {_mm512_maskz_mov_ps((__mmask16)((1u << count) - 1), a.v)}; }
inline F16 load_first(const float* p, int64_t count) { return {_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p)}; }
inline void store_first(float* p, F16 a, int64_t count) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << count) - 1), a.v); }

inline F16 load_bf16(const uint16_t* p) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
}
inline void store_bf16(uint16_t* p, F16 a) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(a.v)); }
inline void store_int8(int8_t* p, I16 a) { _mm_storeu_si128((__m128i*)p, _mm512_cvtsepi32_epi8(a.v)); }
inline void store_int16(int16_t* p, I16 a) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtsepi32_epi16(a.v)); }
inline F16 load_int8(const int8_t* p) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))}; }

inline I16 izero() { return {_mm512_setzero_si512()}; }
// a running sum kept in its register: unrolled, GCC reassociates sums into trees whose products spill to the stack
inline void keep_in_register(I16& a) { __asm__("" : "+v"(a.v)); }

// Weights of one 4-input step of a tile: 32 bytes, byte i holding element i (low nibble) and element i + 32
// (high nibble); element e is output e / 4, input e % 4.
struct Nibbles { __m512i v; };
inline Nibbles unpack_nibbles(const uint8_t* p) {
    const __m256i packed = _mm256_loadu_si256((const __m256i*)p);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(packed, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
    return {_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)};
}
// acc[o] += sum over the 4 inputs of unsigned weight bytes times the signed bytes of x4 (vpdpbusd).
inline I16 dot4(I16 acc, Nibbles w, int32_t x4) { return {_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(x4))}; }

// Weights of one 2-input step of a tile: 32 signed bytes, element e is output e / 2, input e % 2.
struct Pairs { __m512i v; };
inline Pairs load_pairs(const int8_t* p) { return {_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p))}; }
inline Pairs load_pairs(const int16_t* p) { return {_mm512_load_si512(p)}; }  // already widened, 64-aligned
// acc[o] += w[o, 0] * x[0] + w[o, 1] * x[1] over 16-bit x (vpdpwssd).
inline I16 dot2(I16 acc, Pairs w, int32_t x2) { return {_mm512_dpwssd_epi32(acc.v, w.v, _mm512_set1_epi32(x2))}; }

// 64 bytes: a GGUF block's weight codes (unsigned) or activations (signed) for the integer dots of gguf_matmul.cpp.
struct Bytes { __m512i v; };
inline Bytes bytes_load(const void* p) { return {_mm512_loadu_si512(p)}; }
inline Bytes bytes_load2(const void* a, const void* b) {  // 32 bytes from a, then 32 from b
    return {_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                               _mm256_loadu_si256((const __m256i*)b), 1)};
}
inline Bytes bytes_dup(const void* p) { return bytes_load2(p, p); }  // 32 bytes at p, twice
inline Bytes bytes_set1(uint8_t x) { return {_mm512_set1_epi8((char)x)}; }
inline Bytes bytes_and(Bytes a, Bytes b) { return {_mm512_and_si512(a.v, b.v)}; }
inline Bytes bytes_or(Bytes a, Bytes b) { return {_mm512_or_si512(a.v, b.v)}; }
inline Bytes bytes_sub(Bytes a, Bytes b) { return {_mm512_sub_epi8(a.v, b.v)}; }
// 16-bit lanes shifted right by lo bits in the first 32 bytes and hi bits in the last 32 (callers mask the bytes)
inline Bytes bytes_shr(Bytes a, int lo, int hi) {
    return {_mm512_srlv_epi16(a.v, _mm512_inserti64x4(_mm512_set1_epi16((short)lo), _mm256_set1_epi16((short)hi), 1))};
}
inline Bytes bytes_shl4(Bytes a) { return {_mm512_slli_epi16(a.v, 4)}; }  // bytes below 16 only
inline Bytes bytes_abs(Bytes a) { return {_mm512_abs_epi8(a.v)}; }
inline Bytes bytes_sign(Bytes x, Bytes s) {  // x negated where s < 0 (where s is 0, the caller's |s| is 0 too)
    return {_mm512_mask_sub_epi8(x.v, _mm512_movepi8_mask(s.v), _mm512_setzero_si512(), x.v)};
}
// Two blocks of 32 4-bit codes, 16 bytes each (Q4_0/Q4_1: low nibbles are codes 0-15, high nibbles 16-31): a's codes
// then b's, one byte each.
inline Bytes nibble_blocks(const uint8_t* a, const uint8_t* b) {
    const __m256i first = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)a));
    const __m256i second = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)b));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
    const __m512i counts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                            0x0004000400040004, 0x0004000400040004, 0, 0);
    return {_mm512_and_si512(_mm512_srlv_epi16(both, counts), _mm512_set1_epi8(0x0F))};
}
// 32 int16 factors: bytes 16i..16i+15 of a dot are scaled by factor f_i of eight (spread<f_0, f_1, f_2, f_3>).
struct Scales { __m512i v; };
template <int A, int B, int C, int D>
inline Scales spread(__m128i eight) {
    constexpr int64_t a = A * 0x0001000100010001, b = B * 0x0001000100010001, c = C * 0x0001000100010001,
                      d = D * 0x0001000100010001;
    return {_mm512_permutexvar_epi16(_mm512_set_epi64(d, d, c, c, b, b, a, a), _mm512_castsi128_si512(eight))};
}
// acc[i] += sum over bytes 4i..4i+3 of u * s, each pair of products times its byte range's factor (vpmaddubsw cannot
// saturate for u <= 128 and |s| <= 127, the callers' ranges; vpmaddwd then scales and adds the pairs exactly).
inline I16 dot_bytes(I16 acc, Bytes u, Bytes s, Scales k) {
    return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(_mm512_maddubs_epi16(u.v, s.v), k.v))};
}
inline F16 halves(float a, float b) { return {_mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b))}; }
inline F16 halves(const float* p) {  // p[0] in lanes 0-7, p[1] in 8-15
    const __m512i index = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return {_mm512_permutexvar_ps(index, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)p))))};
}
// acc[i] += the sum of bytes 4i..4i+3 of u * s (vpdpbusd)
inline I16 dot_bytes(I16 acc, Bytes u, Bytes s) { return {_mm512_dpbusd_epi32(acc.v, u.v, s.v)}; }
inline void bytes_store(void* p, Bytes a) { _mm512_storeu_si512(p, a.v); }
// The quads' register tile (gguf_lanes.h): groups of 16 outputs and activation rows whose products run together
// (4 x 2 running sums, their runs' sums, two quads and a broadcast in 32 registers).
constexpr int kQuadGroups = 2, kQuadRows = 4;
// dot[r][g][o] += quads first .. last - 1 (64 bytes apart) of codes[g], output o, dotted with x[r]'s 4 codes each.
template <int R, int G>
inline __attribute__((always_inline)) void dot_quads(__m512i (&dot)[R][G], const uint8_t* const (&codes)[G],
                                                     const int8_t* const (&x)[R], int first, int last) {
    for (int s = first; s < last; ++s) {
        __m512i quad[G];
        for (int g = 0; g < G; ++g) quad[g] = _mm512_load_si512(codes[g] + 64 * s);
        for (int r = 0; r < R; ++r) {
            int32_t four;
            __builtin_memcpy(&four, x[r] + 4 * s, 4);
            const __m512i xs = _mm512_set1_epi32(four);
            for (int g = 0; g < G; ++g) {
                dot[r][g] = _mm512_dpbusd_epi32(dot[r][g], quad[g], xs);
                __asm__("" : "+v"(dot[r][g]));  // a running sum in a register (see the AVX2 build's)
            }
        }
    }
}
// Quads: 16 outputs x 4 unsigned codes (64 bytes, 64-aligned; output o at bytes 4o..4o+3), against 4 signed
// activation codes broadcast. For each of R activation rows x[r] and G groups of 16 outputs (codes[g], scales[g]):
// acc[r][g][o] += scale[o] * sum over Steps quads of codes[g][s][o] . x[r][4s..4s+3], exactly (each quad loaded once
// for the R rows, each broadcast once for the G groups: a load per vpdpbusd would bound the loop); scales: per
// output the pair (s, s) of int16 (the AVX2 build's vpmaddwd operand); Group: quads the AVX2 build sums in int16, as
// many as cannot overflow. Here Group / 2 quads' sums fit in int16 too (4 products a lane where vpmaddubsw sums 2):
// where that is two quads or more, each run of them is scaled by vpdpwssd against (s, 0), else the sub-block's sum
// by one multiply (two uops).
template <int Steps, int Group, int R, int G>
inline void scaled_quads(I16 (&acc)[R][G], const uint8_t* const (&codes)[G], const int8_t* const (&x)[R],
                         const int16_t* const (&scales)[G]) {
    constexpr bool by_pairs = Group >= 4;
    constexpr int run = by_pairs ? Group / 2 : Steps;
    static_assert(Steps % run == 0);
    __m512i scale[G];
    for (int g = 0; g < G; ++g) {
        const __m512i pairs = _mm512_load_si512(scales[g]);
        scale[g] = by_pairs ? _mm512_srli_epi32(pairs, 16) : _mm512_srai_epi32(pairs, 16);
    }
    for (int first = 0; first < Steps; first += run) {
        __m512i dot[R][G];
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < G; ++g) dot[r][g] = _mm512_setzero_si512();
        dot_quads(dot, codes, x, first, first + run);
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < G; ++g)
                acc[r][g] = {by_pairs ? _mm512_dpwssd_epi32(acc[r][g].v, dot[r][g], scale[g])
                                      : _mm512_add_epi32(acc[r][g].v, _mm512_mullo_epi32(dot[r][g], scale[g]))};
    }
}
// Signed quads: 16 outputs x 4 signed codes, stored as the build's products read them (kSignedQuadBytes each; here
// each code plus 128, unsigned). For each of R activation rows x[r] with code sum sums[r] and G groups of 16 outputs:
// dots[r][g][o] = the exact sum over Steps quads of quads[g][s][o] . x[r][4s..4s+3] (vpdpbusd from -128 sums[r],
// which takes the 128s back).
constexpr int kSignedQuadBytes = 64;
inline void store_signed_quad_half(uint8_t* quad, int half, __m256i codes) {  // outputs 8 half .. 8 half + 7
    _mm256_store_si256((__m256i*)(quad + 32 * half), _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80)));
}
template <int Steps, int R, int G>
inline void signed_quads(I16 (&dots)[R][G], const uint8_t* const (&quads)[G], const int8_t* const (&x)[R],
                         const int32_t (&sums)[R]) {
    __m512i dot[R][G];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) dot[r][g] = _mm512_set1_epi32(-128 * sums[r]);
    dot_quads(dot, quads, x, 0, Steps);
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) dots[r][g] = {dot[r][g]};
}
// each byte of indices (0-15) replaced by that entry of the 16-byte table
inline Bytes bytes_lookup(const int8_t* table, Bytes indices) {
    return {_mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)table)), indices.v)};
}
// The 64 bytes at p as 4-bit codes: first the low nibbles of bytes 0-31 then their high nibbles, second the same of
// bytes 32-63 (Q4_K's sub-blocks 0-1 and 2-3 of a 128-input half).
inline void nibble_pairs(const uint8_t* p, Bytes& first, Bytes& second) {
    const __m512i v = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0F);
    const __m512i low = _mm512_and_si512(v, mask), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    first = {_mm512_shuffle_i64x2(low, high, _MM_SHUFFLE(1, 0, 1, 0))};
    second = {_mm512_shuffle_i64x2(low, high, _MM_SHUFFLE(3, 2, 3, 2))};
}
// The 64 bytes at p as four blocks of 32 4-bit codes, 16 bytes each (low nibbles codes 0-15, high 16-31): first
// nibble_blocks(p, p + 16), second nibble_blocks(p + 32, p + 48).
inline void nibble_block_pairs(const uint8_t* p, Bytes& first, Bytes& second) {
    const __m512i v = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0F);
    const __m512i low = _mm512_and_si512(v, mask), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    first = {_mm512_permutex2var_epi64(low, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), high)};
    second = {_mm512_permutex2var_epi64(low, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), high)};
}

#elif defined(__AVX2__) && defined(__FMA__)

struct F16 { __m256 lo, hi; };
struct I16 { __m256i lo, hi; };

inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, F16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline F16 add(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 sub(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F16 mul(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 fmadd(F16 a, F16 b, F16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F16 max(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F16 div(F16 a, F16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline F16 select_nonnegative(F16 g, F16 a, F16 b) {  // a where g >= 0, else b
    const __m256 zero = _mm256_setzero_ps();
    return {_mm256_blendv_ps(b.lo, a.lo, _mm256_cmp_ps(g.lo, zero, _CMP_GE_OQ)),
            _mm256_blendv_ps(b.hi, a.hi, _mm256_cmp_ps(g.hi, zero, _CMP_GE_OQ))};
}
inline F16 abs(F16 a) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
inline F16 to_float(I16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline I16 round_to_int(F16 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }  // MXCSR: nearest even
inline F16 round(F16 a) {
    constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
inline __m256 power_of_two(__m256 n) {  // 2^n for whole n >= -126
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F16 scale_by_power_of_two(F16 a, F16 n) {
    return {_mm256_mul_ps(a.lo, power_of_two(n.lo)), _mm256_mul_ps(a.hi, power_of_two(n.hi))};
}
inline float reduce_add(F16 a) {  // the order of _mm512_reduce_add_ps: halves of 256, 128, then pairs
    const __m256 eight = _mm256_add_ps(a.lo, a.hi);
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
inline float reduce_max(F16 a) {
    const __m256 eight = _mm256_max_ps(a.lo, a.hi);
    const __m128 four = _mm_max_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
}
inline __m256i lanes_below(int64_t count, int first) {
    const __m256i index = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), index);
}
inline F16 first_lanes(F16 a, int64_t count) {
    return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lanes_below(count, 0))),
            _mm256_and_ps(a.hi, _mm256_castsi256_ps(lanes_below(count, 8)))};
}
inline F16 load_first(const float* p, int64_t count) {
    return {_mm256_maskload_ps(p, lanes_below(count, 0)), _mm256_maskload_ps(p + 8, lanes_below(count, 8))};
}
inline void store_first(float* p, F16 a, int64_t count) {
    _mm256_maskstore_ps(p, lanes_below(count, 0), a.lo);
    _mm256_maskstore_ps(p + 8, lanes_below(count, 8), a.hi);
}

inline __m256 bf16_to_float(__m128i eight) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(eight), 16)); }
inline F16 load_bf16(const uint16_t* p) {
    return {bf16_to_float(_mm_loadu_si128((const __m128i*)p)), bf16_to_float(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
inline __m128i float_to_bf16(__m256 v) {  // round to nearest even, as vcvtneps2bf16 does for numbers
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
inline void store_bf16(uint16_t* p, F16 a) {
    _mm_storeu_si128((__m128i*)p, float_to_bf16(a.lo));
    _mm_storeu_si128((__m128i*)(p + 8), float_to_bf16(a.hi));
}
inline __m128i saturate_to_int16(__m256i v) { return _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)); }
inline void store_int8(int8_t* p, I16 a) {
    _mm_storeu_si128((__m128i*)p, _mm_packs_epi16(saturate_to_int16(a.lo), saturate_to_int16(a.hi)));
}
inline void store_int16(int16_t* p, I16 a) {
    _mm_storeu_si128((__m128i*)p, saturate_to_int16(a.lo));
    _mm_storeu_si128((__m128i*)(p + 8), saturate_to_int16(a.hi));
}
inline F16 load_int8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
}

inline I16 izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline void keep_in_register(I16& a) { __asm__("" : "+x"(a.lo), "+x"(a.hi)); }

struct Nibbles { __m256i lo, hi; };  // outputs 0..7 and 8..15
inline Nibbles unpack_nibbles(const uint8_t* p) {
    const __m256i packed = _mm256_loadu_si256((const __m256i*)p);
    const __m256i low = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(packed, low), _mm256_and_si256(_mm256_srli_epi16(packed, 4), low)};
}
// vpmaddubsw cannot saturate here (2 x 15 x 128 < 32768); vpmaddwd then adds the pairs: the exact vpdpbusd sums.
inline __m256i dot4_half(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
inline I16 dot4(I16 acc, Nibbles w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    return {dot4_half(acc.lo, w.lo, x), dot4_half(acc.hi, w.hi, x)};
}

struct Pairs { __m256i lo, hi; };
inline Pairs load_pairs(const int8_t* p) {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p + 16)))};
}
inline Pairs load_pairs(const int16_t* p) {
    return {_mm256_load_si256((const __m256i*)p), _mm256_load_si256((const __m256i*)(p + 16))};
}
inline I16 dot2(I16 acc, Pairs w, int32_t x2) {
    const __m256i x = _mm256_set1_epi32(x2);
    return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(w.lo, x)), _mm256_add_epi32(acc.hi, _mm256_madd_epi16(w.hi, x))};
}

struct Bytes { __m256i lo, hi; };
inline Bytes bytes_load(const void* p) {
    return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)((const uint8_t*)p + 32))};
}
inline Bytes bytes_load2(const void* a, const void* b) {
    return {_mm256_loadu_si256((const __m256i*)a), _mm256_loadu_si256((const __m256i*)b)};
}
inline Bytes bytes_dup(const void* p) { return bytes_load2(p, p); }
inline Bytes bytes_set1(uint8_t x) { return {_mm256_set1_epi8((char)x), _mm256_set1_epi8((char)x)}; }
inline Bytes bytes_and(Bytes a, Bytes b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
inline Bytes bytes_or(Bytes a, Bytes b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
inline Bytes bytes_sub(Bytes a, Bytes b) { return {_mm256_sub_epi8(a.lo, b.lo), _mm256_sub_epi8(a.hi, b.hi)}; }
inline Bytes bytes_shr(Bytes a, int lo, int hi) {
    return {_mm256_srl_epi16(a.lo, _mm_cvtsi32_si128(lo)), _mm256_srl_epi16(a.hi, _mm_cvtsi32_si128(hi))};
}
inline Bytes bytes_shl4(Bytes a) { return {_mm256_slli_epi16(a.lo, 4), _mm256_slli_epi16(a.hi, 4)}; }
inline Bytes bytes_abs(Bytes a) { return {_mm256_abs_epi8(a.lo), _mm256_abs_epi8(a.hi)}; }
inline Bytes bytes_sign(Bytes x, Bytes s) { return {_mm256_sign_epi8(x.lo, s.lo), _mm256_sign_epi8(x.hi, s.hi)}; }
inline __m256i nibble_block(const uint8_t* p) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
    return _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
}
inline Bytes nibble_blocks(const uint8_t* a, const uint8_t* b) { return {nibble_block(a), nibble_block(b)}; }
struct Scales { __m256i lo, hi; };
template <int F>
inline __m128i broadcast_factor(__m128i eight) {  // int16 lane F of eight, in all 8 lanes
    return _mm_shuffle_epi8(eight, _mm_set1_epi16((short)(2 * F | (2 * F + 1) << 8)));
}
template <int A, int B, int C, int D>
inline Scales spread(__m128i eight) {
    return {_mm256_setr_m128i(broadcast_factor<A>(eight), broadcast_factor<B>(eight)),
            _mm256_setr_m128i(broadcast_factor<C>(eight), broadcast_factor<D>(eight))};
}
inline I16 dot_bytes(I16 acc, Bytes u, Bytes s, Scales k) {
    return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(u.lo, s.lo), k.lo)),
            _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(u.hi, s.hi), k.hi))};
}
inline F16 halves(float a, float b) { return {_mm256_set1_ps(a), _mm256_set1_ps(b)}; }
inline F16 halves(const float* p) { return {_mm256_broadcast_ss(p), _mm256_broadcast_ss(p + 1)}; }
inline I16 dot_bytes(I16 acc, Bytes u, Bytes s) {  // vpmaddubsw cannot saturate for u <= 128, |s| <= 127
    const __m256i ones = _mm256_set1_epi16(1);
    return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(u.lo, s.lo), ones)),
            _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(u.hi, s.hi), ones))};
}
inline void bytes_store(void* p, Bytes a) {
    _mm256_storeu_si256((__m256i*)p, a.lo);
    _mm256_storeu_si256((__m256i*)((uint8_t*)p + 32), a.hi);
}
constexpr int kQuadGroups = 1, kQuadRows = 2;  // 16 registers: 2 x 2 running sums (lo, hi) and their int16 sums
template <int Steps, int Group, int R, int G>
inline void scaled_quads(I16 (&acc)[R][G], const uint8_t* const (&codes)[G], const int8_t* const (&x)[R],
                         const int16_t* const (&scales)[G]) {
    static_assert(Steps % Group == 0);
    for (int group = 0; group < G; ++group) {  // 16 ymm registers: one group of outputs at a time
        const __m256i scale_lo = _mm256_load_si256((const __m256i*)scales[group]);
        const __m256i scale_hi = _mm256_load_si256((const __m256i*)(scales[group] + 16));
        for (int first = 0; first < Steps; first += Group) {
            __m256i lo[R], hi[R];
            for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
            for (int s = first; s < first + Group; ++s) {
                const __m256i quad_lo = _mm256_load_si256((const __m256i*)(codes[group] + 64 * s));
                const __m256i quad_hi = _mm256_load_si256((const __m256i*)(codes[group] + 64 * s + 32));
                for (int r = 0; r < R; ++r) {
                    int32_t four;
                    __builtin_memcpy(&four, x[r] + 4 * s, 4);
                    const __m256i xs = _mm256_set1_epi32(four);
                    lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(quad_lo, xs));
                    hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(quad_hi, xs));
                    // kept a running sum in a register: reassociated into a tree, the products spill to the stack
                    __asm__("" : "+x"(lo[r]), "+x"(hi[r]));
                }
            }
            for (int r = 0; r < R; ++r) {
                acc[r][group].lo = _mm256_add_epi32(acc[r][group].lo, _mm256_madd_epi16(lo[r], scale_lo));
                acc[r][group].hi = _mm256_add_epi32(acc[r][group].hi, _mm256_madd_epi16(hi[r], scale_hi));
            }
        }
    }
}
// Signed quads (see the AVX512 build's): here |c| of the 16 outputs, then c, so each activation takes its weight's
// sign (vpsignb) and vpmaddubsw multiplies magnitudes (2 x 128 x 127 < 32768: no saturation); the sums are unused.
constexpr int kSignedQuadBytes = 128;
inline void store_signed_quad_half(uint8_t* quad, int half, __m256i codes) {
    _mm256_store_si256((__m256i*)(quad + 32 * half), _mm256_abs_epi8(codes));
    _mm256_store_si256((__m256i*)(quad + 64 + 32 * half), codes);
}
template <int Steps, int R, int G>
inline void signed_quads(I16 (&dots)[R][G], const uint8_t* const (&quads)[G], const int8_t* const (&x)[R],
                         const int32_t (&sums)[R]) {
    (void)sums;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int group = 0; group < G; ++group) {
        __m256i lo[R], hi[R];
        for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
        for (int s = 0; s < Steps; ++s) {
            const uint8_t* quad = quads[group] + kSignedQuadBytes * s;
            const __m256i size_lo = _mm256_load_si256((const __m256i*)quad), size_hi = _mm256_load_si256((const __m256i*)(quad + 32));
            const __m256i sign_lo = _mm256_load_si256((const __m256i*)(quad + 64)), sign_hi = _mm256_load_si256((const __m256i*)(quad + 96));
            for (int r = 0; r < R; ++r) {
                int32_t four;
                __builtin_memcpy(&four, x[r] + 4 * s, 4);
                const __m256i xs = _mm256_set1_epi32(four);
                lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(_mm256_maddubs_epi16(size_lo, _mm256_sign_epi8(xs, sign_lo)), ones));
                hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(size_hi, _mm256_sign_epi8(xs, sign_hi)), ones));
                __asm__("" : "+x"(lo[r]), "+x"(hi[r]));
            }
        }
        for (int r = 0; r < R; ++r) dots[r][group] = {lo[r], hi[r]};
    }
}
inline Bytes bytes_lookup(const int8_t* table, Bytes indices) {
    const __m256i entries = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)table));
    return {_mm256_shuffle_epi8(entries, indices.lo), _mm256_shuffle_epi8(entries, indices.hi)};
}
inline void nibble_pairs(const uint8_t* p, Bytes& first, Bytes& second) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 32));
    first = {_mm256_and_si256(a, mask), _mm256_and_si256(_mm256_srli_epi16(a, 4), mask)};
    second = {_mm256_and_si256(b, mask), _mm256_and_si256(_mm256_srli_epi16(b, 4), mask)};
}
inline void nibble_block_pairs(const uint8_t* p, Bytes& first, Bytes& second) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 32));
    const __m256i a_low = _mm256_and_si256(a, mask), a_high = _mm256_and_si256(_mm256_srli_epi16(a, 4), mask);
    const __m256i b_low = _mm256_and_si256(b, mask), b_high = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    first = {_mm256_permute2x128_si256(a_low, a_high, 0x20), _mm256_permute2x128_si256(a_low, a_high, 0x31)};
    second = {_mm256_permute2x128_si256(b_low, b_high, 0x20), _mm256_permute2x128_si256(b_low, b_high, 0x31)};
}

#else
#error "quant_matmul.cpp needs AVX512 (F, BW, VL, VNNI, BF16) or AVX2 with FMA"
#endif


// Activations, caches and outputs come as bf16 (uint16_t, the bf16 model) or fp32 (float, the fp32 model).
inline F16 load_elements(const uint16_t* bf16) { return load_bf16(bf16); }
inline F16 load_elements(const float* p) { return load(p); }
inline void store_elements(uint16_t* bf16, F16 a) { store_bf16(bf16, a); }
inline void store_elements(float* p, F16 a) { store(p, a); }
inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {
    const uint32_t bits = (uint32_t)bf16 << 16;
    float value;
    __builtin_memcpy(&value, &bits, 4);
    return value;
}

// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into an integer power and a degree-6
// polynomial on [-0.5, 0.5]; relative error below 2e-7, and exactly 0 far below.
inline F16 exp_nonpositive(F16 x) {
    x = max(x, set1(-87.0f));
    const F16 t = mul(x, set1(1.44269504088896341f));
    const F16 n = round(t);
    const F16 f = mul(sub(t, n), set1(0.693147180559945309f));  // in [-0.35, 0.35]
    F16 p = set1(1.0f / 720);
    p = fmadd(p, f, set1(1.0f / 120));
    p = fmadd(p, f, set1(1.0f / 24));
    p = fmadd(p, f, set1(1.0f / 6));
    p = fmadd(p, f, set1(0.5f));
    p = fmadd(p, f, set1(1.0f));
    p = fmadd(p, f, set1(1.0f));
    return scale_by_power_of_two(p, n);
}

// SiLU, g * sigmoid(g), in fp32: with e = e^-|g|, sigmoid is 1 / (1 + e) where g >= 0 and e / (1 + e) below.
inline F16 silu(F16 g) {
    const F16 e = exp_nonpositive(sub(zero(), abs(g)));
    const F16 inverse = div(set1(1.0f), add(set1(1.0f), e));
    return mul(g, select_nonnegative(g, inverse, mul(e, inverse)));
}

// 1 / sqrt(mean(x^2) + eps) of one row, the RMSNorm factor a fused norm applies before quantizing.
template <typename Load>
float inverse_rms(Load load, int64_t k, float eps) {
    F16 squares = zero();
    for (int64_t i = 0; i < k; i += 16) {
        const F16 v = load(i);
        squares = fmadd(v, v, squares);
    }
    return 1.0f / std::sqrt(reduce_add(squares) / (float)k + eps);
}

// Both builds (AVX2 instructions, the same bits): int16 dots of at most 16 factors with 16 sums, and 4-lane floats.
inline __m128i madd16(__m256i a, __m256i b) {  // the 8 pair sums of a * b, folded to 4 int32 lanes
    const __m256i pairs = _mm256_madd_epi16(a, b);
    return _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
}
inline float reduce_add4(__m128 a) {
    const __m128 two = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

// Words 0-7 (32 bits each) of the 32 bytes at rows[i] + at, i < 8, transposed: word t of each row side by side
// in out[t] (both builds: the same instructions). The 128-bit halves of rows i and i + 4 are loaded into one
// register each, then transposed 4 x 4 within the halves: shifts and blends pair the words, one unpack a pair of
// pairs, so only a third of the port-5 shuffles of a full 8 x 8 transpose remain.
inline void transpose_words(const uint8_t* const* rows, int at, __m256i (&out)[8]) {
    for (int half = 0; half < 2; ++half) {  // words 0-3, then 4-7
        __m256i a[4], t[4];
        for (int i = 0; i < 4; ++i)
            a[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(rows[i] + at + 16 * half))),
                                           _mm_loadu_si128((const __m128i*)(rows[i + 4] + at + 16 * half)), 1);
        for (int i = 0; i < 4; i += 2) {  // (a_i w0, a_i+1 w0, a_i w2, a_i+1 w2) and the same of w1, w3
            t[i] = _mm256_blend_epi32(a[i], _mm256_slli_epi64(a[i + 1], 32), 0xAA);
            t[i + 1] = _mm256_blend_epi32(_mm256_srli_epi64(a[i], 32), a[i + 1], 0xAA);
        }
        out[4 * half] = _mm256_unpacklo_epi64(t[0], t[2]);
        out[4 * half + 1] = _mm256_unpacklo_epi64(t[1], t[3]);
        out[4 * half + 2] = _mm256_unpackhi_epi64(t[0], t[2]);
        out[4 * half + 3] = _mm256_unpackhi_epi64(t[1], t[3]);
    }
}

// The 16 x 16 bytes of r transposed: byte j of r[i] becomes byte i of r[j] (four rounds of interleaving rows i and
// i + 8, each a rotation of a byte's 8-bit row:column index).
inline void transpose_bytes(__m128i (&r)[16]) {
    for (int round = 0; round < 4; ++round) {
        __m128i next[16];
        for (int i = 0; i < 8; ++i) {
            next[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
            next[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = next[i];
    }
}

// Weights stream from memory once a step: a kernel asks for the bytes it will read kPrefetchDistance ahead of the
// `bytes` at p it reads now (without it a super-block's decode hides the next lines' loads from the core's window;
// the hardware prefetchers alone gave Q4_K 9 GB/s from DRAM on a 2-core Xeon slice whose reads reach 21, 20.8 with it).
constexpr int64_t kPrefetchDistance = 2048;
inline void prefetch(const void* p, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char*)p + line, _MM_HINT_T0);
}
inline void prefetch_ahead(const void* p, int64_t bytes) { prefetch((const char*)p + kPrefetchDistance, bytes); }
inline void prefetch_to_l2(const void* p, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char*)p + line, _MM_HINT_T1);
}

}  // namespace simd
