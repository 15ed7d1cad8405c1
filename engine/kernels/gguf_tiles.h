// The amx build's products over GGUF blocks (included by gguf_matmul.cpp, which defines the blocks' decoders): 16
// weight rows against up to 16 activation rows per AMX tile op, for Q4_K, Q5_K, Q6_K and Q8_0.
//
// A tile op multiplies A [16 weight rows, one sub-block's codes] by B [the sub-block's activations, 16 rows] into
// C [16, 16] int32, exactly. The weights' codes are unpacked to bytes in input order (A rows are weight rows, so no
// weight is transposed); the activations are interleaved once per call into the 4-byte groups B tiles read. Each
// sub-block's C is scaled in fp32 by d x its sub-block scale (less its offset term: the mins times the activations'
// code sums), and each block of activations by its scale: per output, the same math as the vector kernels, with
// the products summed per sub-block first (other float32 roundings than theirs, within the same bound).
namespace tiles {

constexpr int kRows = 16;     // weight rows (A rows) and activation rows (B columns / 4) of one tile op
constexpr int kGroup = 256;   // inputs decoded per step: a K-quant super-block, or 8 Q8_0 blocks

bool supports(int64_t type, int64_t k) {
    return type == Q4_K || type == Q5_K || type == Q6_K || (type == Q8_0 && k % kGroup == 0);
}

// Up to 16 activation rows as B tiles read them: per 4 inputs, 16 rows of 4 codes (missing rows 0), and per block
// (and per 16 and 32 codes: their sums) one 16-lane vector over the rows.
struct Columns {
    std::vector<int8_t> q;        // [k / 4][16][4]
    std::vector<float> d;         // [k / block][16]
    std::vector<float> sums;      // [k / 16][16]
    std::vector<float> sums32;    // [k / 32][16]

    Columns(const Quantized& x, int64_t k, int64_t first, int64_t count)
        : q(k * kRows, 0), d(k / x.block * kRows, 0.0f), sums(k / 16 * kRows, 0.0f), sums32(k / 32 * kRows, 0.0f) {
        const int64_t blocks = k / x.block;
        for (int64_t r = 0; r < count; ++r) {
            const int8_t* codes = x.q.data() + (first + r) * k;
            for (int64_t g = 0; g < k / 4; ++g) std::memcpy(&q[(g * kRows + r) * 4], codes + 4 * g, 4);
            for (int64_t b = 0; b < blocks; ++b) d[b * kRows + r] = x.d[(first + r) * blocks + b];
            for (int64_t i = 0; i < k / 16; ++i) sums[i * kRows + r] = x.sums[(first + r) * (k / 16) + i];
            for (int64_t i = 0; i < k / 32; ++i) sums32[i * kRows + r] = x.sums32[(first + r) * (k / 32) + i];
        }
    }
};

// One step of 256 inputs of 16 weight rows: codes as bytes in input order (A), and per sub-block of each row its
// scale (d s_j) and offset factor (dmin m_j for Q4_K/Q5_K, 32 d s_j for Q6_K's codes c - 32; none for Q8_0).
template <int64_t type>
struct Step {
    static constexpr int width = type == Q6_K ? 16 : 32;
    static constexpr int subs = kGroup / width;
    alignas(64) uint8_t codes[kRows][kGroup];
    alignas(64) float scale[kRows][subs];
    alignas(64) float offset[kRows][subs];

    void decode(const uint8_t* row, int n) {
        if constexpr (type == Q8_0) {
            for (int j = 0; j < subs; ++j) {
                const uint8_t* block = row + 34 * j;
                std::memcpy(codes[n] + 32 * j, block + 2, 32);
                scale[n][j] = half_to_float(block);
            }
            return;
        }
        SuperBlock s;
        if constexpr (type == Q6_K) {
            s = decode_q6k(row);
            const __m512 factors = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + 192))));
            _mm512_store_ps(scale[n], _mm512_mul_ps(factors, _mm512_set1_ps(s.d)));
            _mm512_store_ps(offset[n], _mm512_mul_ps(factors, _mm512_set1_ps(s.offset_scale)));
        } else {
            s = decode_q4k_q5k<type>(row);
            const __m128i packed = scales_and_mins(row + 4);
            const __m256 scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
            const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8)));
            _mm256_store_ps(scale[n], _mm256_mul_ps(scales, _mm256_set1_ps(s.d)));
            _mm256_store_ps(offset[n], _mm256_mul_ps(mins, _mm256_set1_ps(s.offset_scale)));
        }
        for (int j = 0; j < 4; ++j) _mm512_store_si512(codes[n] + 64 * j, s.codes[j].v);
    }
};

// y[i][r] (i < count weight rows from w, row_bytes apart; r < 16 activation rows of x) over k inputs. Sub-blocks
// go two at a time into C tiles 0-1 or 2-3 in turn, so a pair's products run while the one before is scaled.
template <int64_t type>
void dot(const uint8_t* w, int64_t row_bytes, int64_t count, int64_t k, const Columns& x, float (*y)[kRows]) {
    using S = Step<type>;
    constexpr int width = S::width, subs = S::subs;
    constexpr int64_t b_step = width / 4 * (4 * kRows);  // bytes of B per sub-block
    amx::configure(width);
    // two steps in turn: the next step decodes while this one's tile products run
    thread_local S steps[2];  // rows past count hold what an earlier call left: their sums are never stored
    alignas(64) int32_t c[2][2][kRows][kRows];  // per pair in turn, per sub-block of the pair
    __m512 total[kRows];
    for (int n = 0; n < kRows; ++n) total[n] = _mm512_setzero_ps();
    const int64_t bytes = block_bytes(type) * (type == Q8_0 ? kGroup / 32 : 1);
    // while a step decodes, the same share of the rows after these (the next tile's, as threads take tiles in
    // order) is requested from memory: 16 rows read side by side defeat the hardware's stream prefetch
    const uint8_t* next = w + count * row_bytes;
    auto decode = [&](int64_t g) {
        simd::prefetch_to_l2(next + g * kRows * bytes, kRows * bytes);
        for (int n = 0; n < count; ++n) steps[g % 2].decode(w + n * row_bytes + g * bytes, n);
    };
    const int64_t groups = k / kGroup;
    decode(0);
    for (int64_t g = 0; g < groups; ++g) {
        if (g + 1 < groups) decode(g + 1);
        const S& step = steps[g % 2];
        __m512 part[kRows];
        for (int n = 0; n < kRows; ++n) part[n] = _mm512_setzero_ps();
        // the products of sub-blocks j, j + 1, stored to c[j / 2 % 2]
        auto products = [&](int j) {
            const int8_t* b = x.q.data() + (g * kGroup + j * width) / 4 * (4 * kRows);
            const uint8_t* a = step.codes[0] + j * width;
            // Q8_0's codes are signed, the others' unsigned; the activations signed
#define SUB_BLOCK_PAIR(C0, C1, DOT)                                       \
    AMX_PRODUCT(C0, 4, 6, a, kGroup, b, DOT)                              \
    AMX_PRODUCT(C1, 5, 7, a + width, kGroup, b + b_step, DOT)             \
    _tile_stored(C0, c[(C0) / 2][0], 64);                                 \
    _tile_stored(C1, c[(C0) / 2][1], 64);
            const bool first = j / 2 % 2 == 0;
            if constexpr (type == Q8_0) {
                if (first) { SUB_BLOCK_PAIR(0, 1, _tile_dpbssd) } else { SUB_BLOCK_PAIR(2, 3, _tile_dpbssd) }
            } else {
                if (first) { SUB_BLOCK_PAIR(0, 1, _tile_dpbusd) } else { SUB_BLOCK_PAIR(2, 3, _tile_dpbusd) }
            }
#undef SUB_BLOCK_PAIR
        };
        // sub-blocks j, j + 1 scaled into part
        auto scale = [&](int j0) {
            for (int t = 0; t < 2; ++t) {
                const int j = j0 + t;
                const int32_t(*dots)[kRows] = c[j0 / 2 % 2][t];
                if constexpr (type == Q8_0) {  // activation blocks of 32: each sub-block has its own scale
                    const __m512 dx = _mm512_loadu_ps(x.d.data() + (g * subs + j) * kRows);
                    for (int n = 0; n < kRows; ++n) {
                        const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots[n]));
                        part[n] = _mm512_fmadd_ps(_mm512_mul_ps(dot, _mm512_set1_ps(step.scale[n][j])), dx, part[n]);
                    }
                } else {
                    const float* code_sums = width == 16 ? x.sums.data() + (g * subs + j) * kRows
                                                         : x.sums32.data() + (g * subs + j) * kRows;
                    const __m512 sums = _mm512_loadu_ps(code_sums);
                    for (int n = 0; n < kRows; ++n) {
                        const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots[n]));
                        part[n] = _mm512_fmadd_ps(dot, _mm512_set1_ps(step.scale[n][j]), part[n]);
                        part[n] = _mm512_fnmadd_ps(sums, _mm512_set1_ps(step.offset[n][j]), part[n]);
                    }
                }
            }
        };
        products(0);
        for (int j = 2; j < subs; j += 2) {
            products(j);
            scale(j - 2);
        }
        scale(subs - 2);
        if constexpr (type == Q8_0) {
            for (int n = 0; n < kRows; ++n) total[n] = _mm512_add_ps(total[n], part[n]);
        } else {
            const __m512 dx = _mm512_loadu_ps(x.d.data() + g * kRows);
            for (int n = 0; n < kRows; ++n) total[n] = _mm512_fmadd_ps(part[n], dx, total[n]);
        }
    }
    for (int n = 0; n < count; ++n) _mm512_storeu_ps(y[n], total[n]);
}

// The 16 outputs y[0..15][r] of each activation row r < rows written side by side at out[at + r * stride], as
// gguf_linear finishes one (store_outputs).
void finish(const float (*y)[kRows], int rows, const float* bias, bool accumulate, bool out_fp32, void* out, int64_t at,
            int64_t stride) {
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(kRows));
    for (int r = 0; r < rows; ++r, at += stride)
        store_outputs({_mm512_i32gather_ps(column, &y[0][r], 4)}, bias, accumulate, out_fp32, out, at);
}

void dot_type(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t count, int64_t k, const Columns& x,
              float (*y)[kRows]) {
    switch (type) {
        case Q4_K: dot<Q4_K>(w, row_bytes, count, k, x, y); break;
        case Q5_K: dot<Q5_K>(w, row_bytes, count, k, x, y); break;
        case Q6_K: dot<Q6_K>(w, row_bytes, count, k, x, y); break;
        default: dot<Q8_0>(w, row_bytes, count, k, x, y); break;
    }
}

}  // namespace tiles
