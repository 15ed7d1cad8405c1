// The vector builds' products of many activation rows over Q4_K, Q5_K, Q6_K and Q8_0 (included by gguf_matmul.cpp,
// which defines the blocks' decoders): 16 weight rows side by side, one output per 32-bit lane (avx512: two such
// groups to a tile).
//
// A super-block of 16 weight rows is decoded once and its codes interleaved per 4 inputs ("quads": 16 outputs x 4
// codes, 64 bytes); every activation row then broadcasts its 4 codes of a quad against the tile's outputs (avx512:
// four rows x two groups at a time, so a loaded quad serves four products and a broadcast two; avx2: two rows x one
// group). A sub-block's integer dot is exact and its scale applied in integers (AVX512: vpdpbusd, then vpdpwssd by
// the scale over runs of quads whose sums fit in int16, or one multiply; AVX2: vpmaddubsw products summed in int16
// as far as they cannot overflow, then vpmaddwd by the scale), so the two builds give the same bits and the decode
// is paid once for all rows, not once per few. Per super-block and row, in fp32:
//   y += float(sum_j s_j c_j . q) d dx - float(sum_j o_j S_j) o dx
// with o_j, o the offset weights and scale (Q4_K/Q5_K: the mins and dmin; Q6_K: the scales and 32 d) and S_j the
// activations' code sums per sub-block: the vector kernels' math with other float32 roundings, within their bound.
// Q8_0 takes 8 blocks of 32 as its super-block, each block's exact integer dot scaled by its own d dx.
namespace lanes {

constexpr int kOutputs = 16;  // weight rows side by side (a decoded Step)
constexpr int kGroups = simd::kQuadGroups;  // Steps a tile computes together, in steps of kWideRows rows or more
constexpr int kTileOutputs = kOutputs * kGroups;
constexpr int kRows = simd::kQuadRows;  // activation rows whose products run together
// Fewer rows are bound by reading the weights, which a tile of 16 does faster (Xeon 6 model 167, 4096 x 4096 from
// memory, 4 rows, avx512, ms, 16 / 32 outputs: Q6_K 0.83 / 1.06, Q8_0 0.78 / 0.84; at 16 rows 1.89 / 1.92,
// 1.46 / 1.22, and Q4_K 1.48 / 1.17).
constexpr int64_t kWideRows = 8;

// The groups of 16 outputs a tile holds in a step of `rows` activation rows.
int groups(int64_t rows) { return rows >= kWideRows ? kGroups : 1; }
constexpr int64_t kChunk = 64;  // activation rows a decoded super-block serves before the next is decoded

bool supports(int64_t type, int64_t k) {
    return type == Q4_K || type == Q5_K || type == Q6_K || (type == Q8_0 && k % 256 == 0);
}

// A row's bytes for 256 inputs (one super-block; Q8_0: 8 blocks).
int64_t step_bytes(int64_t type) { return 256 / block_size(type) * block_bytes(type); }

// What rows past a matrix's last read instead of a super-block: zeros (d = 0, so their outputs are 0); Q8_0's 8
// blocks are the largest (272 bytes).
alignas(64) constexpr uint8_t kZeroBlock[288] = {};

// One super-block of 16 weight rows, as the rows' products read it. The codes are taken 8 outputs at a time: the
// same 32 bytes of each output's block, transposed as 32-bit words (word t of each output side by side), and only
// then unpacked, so each word's bytes land on the quads of their inputs.
template <int64_t type>
struct Step {
    static constexpr int width = type == Q6_K ? 16 : 32;  // inputs per sub-block
    static constexpr int subs = 256 / width;
    // quads whose int16 sums cannot overflow: 2 x (largest code) x 127 per quad, below 32768
    static constexpr int group = type == Q4_K ? 8 : type == Q5_K ? 4 : 2;
    alignas(64) uint8_t codes[64][kOutputs][4];        // quad, output, input
    alignas(64) int16_t scales[subs][kOutputs][2];     // s_j per output, twice (vpmaddwd's pairs)
    alignas(64) int16_t offsets[subs / 2][kOutputs][2]; // o_j, o_j+1 per output
    alignas(64) float d[kOutputs], offset_scale[kOutputs];

    // Rows n < count of the super-block at w (row_bytes apart); the others zero.
    void decode(const uint8_t* w, int64_t row_bytes, int count) {
        const uint8_t* blocks[kOutputs];
        for (int n = 0; n < kOutputs; ++n) blocks[n] = n < count ? w + n * row_bytes : kZeroBlock;
        factors(blocks);
        for (int half = 0; half < 2; ++half) {
            if constexpr (type == Q6_K) {
                q6k_codes(blocks + 8 * half, half);
            } else {
                q4k_q5k_codes(blocks + 8 * half, half);
            }
        }
    }

  private:
    // d, the offset scale, and the sub-block factors: each output's 16 bytes of them (Q4_K/Q5_K: 8 scales then 8
    // mins, 6 bits each; Q6_K: 16 int8 scales) transposed, so byte vector j holds factor j of the 16 outputs
    void factors(const uint8_t* const* blocks) {
        __m128i bytes[16];
        for (int n = 0; n < kOutputs; ++n) {
            if constexpr (type == Q6_K) {
                d[n] = half_to_float(blocks[n] + 208);
                offset_scale[n] = 32.0f * d[n];
                bytes[n] = _mm_loadu_si128((const __m128i*)(blocks[n] + 192));
            } else {
                d[n] = half_to_float(blocks[n]);
                offset_scale[n] = half_to_float(blocks[n] + 2);
                bytes[n] = scales_and_mins(blocks[n] + 4);
            }
        }
        simd::transpose_bytes(bytes);
        for (int j = 0; j < subs; ++j) {  // int8 to int16 (Q4_K's scales are below 64), each twice
            const __m128i first = _mm_cvtepi8_epi16(bytes[j]), second = _mm_cvtepi8_epi16(_mm_srli_si128(bytes[j], 8));
            _mm_store_si128((__m128i*)scales[j][0], _mm_unpacklo_epi16(first, first));
            _mm_store_si128((__m128i*)scales[j][4], _mm_unpackhi_epi16(first, first));
            _mm_store_si128((__m128i*)scales[j][8], _mm_unpacklo_epi16(second, second));
            _mm_store_si128((__m128i*)scales[j][12], _mm_unpackhi_epi16(second, second));
        }
        const int first_offset = type == Q6_K ? 0 : 8;
        for (int i = 0; i < subs / 2; ++i) {
            const __m128i even = bytes[first_offset + 2 * i], odd = bytes[first_offset + 2 * i + 1];
            _mm256_store_si256((__m256i*)offsets[i][0], _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(even, odd)));
            _mm256_store_si256((__m256i*)offsets[i][8], _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(even, odd)));
        }
    }
    // bits [shift, shift + width) of each byte, moved to bits 4.. (the codes' tops)
    static __m256i tops(__m256i v, int shift, uint8_t mask) {
        return _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8((char)mask)), 4);
    }
    void store(int quad, int half, __m256i v) { _mm256_store_si256((__m256i*)codes[quad][8 * half], v); }
    // Q4_K/Q5_K: byte l of the 32 at qs + 32j holds input 64j + l (low nibble) and 64j + 32 + l (high nibble); Q5_K's
    // fifth bits: bit 2j (low) and 2j + 1 (high) of byte l of the 32 at 16
    void q4k_q5k_codes(const uint8_t* const* blocks, int half) {
        const __m256i nibble = _mm256_set1_epi8(0x0F);
        __m256i fifth[8];
        if constexpr (type == Q5_K) simd::transpose_words(blocks, 16, fifth);
        for (int j = 0; j < 4; ++j) {
            __m256i r[8];
            simd::transpose_words(blocks, (type == Q4_K ? 16 : 48) + 32 * j, r);
            for (int t = 0; t < 8; ++t) {
                __m256i low = _mm256_and_si256(r[t], nibble), high = _mm256_and_si256(_mm256_srli_epi16(r[t], 4), nibble);
                if constexpr (type == Q5_K) {
                    low = _mm256_or_si256(low, tops(fifth[t], 2 * j, 1));
                    high = _mm256_or_si256(high, tops(fifth[t], 2 * j + 1, 1));
                }
                store(16 * j + t, half, low);
                store(16 * j + 8 + t, half, high);
            }
        }
    }
    // Q6_K: half h, byte l of the 32 at 64h + 32c holds input 128h + 32c + l (low nibble) and 128h + 64 + 32c + l
    // (high nibble); their tops: bits 2c, 2c + 1 and 4 + 2c, 5 + 2c of byte l of the 32 at 128 + 32h
    void q6k_codes(const uint8_t* const* blocks, int half) {
        const __m256i nibble = _mm256_set1_epi8(0x0F);
        for (int h = 0; h < 2; ++h) {
            __m256i top[8];
            simd::transpose_words(blocks, 128 + 32 * h, top);
            for (int c = 0; c < 2; ++c) {
                __m256i r[8];
                simd::transpose_words(blocks, 64 * h + 32 * c, r);
                for (int t = 0; t < 8; ++t) {
                    const __m256i low = _mm256_or_si256(_mm256_and_si256(r[t], nibble), tops(top[t], 2 * c, 3));
                    const __m256i high = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(r[t], 4), nibble),
                                                         tops(top[t], 4 + 2 * c, 3));
                    store(32 * h + 8 * c + t, half, low);
                    store(32 * h + 16 + 8 * c + t, half, high);
                }
            }
        }
    }
};

// Q8_0: 8 blocks of 32 inputs of 16 weight rows, each block's 8 quads in the build's signed layout and its scale per
// output.
template <>
struct Step<Q8_0> {
    static constexpr int blocks = 8, bytes_per_block = 34;  // a block: its fp16 d, then 32 int8 codes
    alignas(64) uint8_t codes[8 * blocks][simd::kSignedQuadBytes];
    alignas(64) float d[blocks][kOutputs];

    void decode(const uint8_t* w, int64_t row_bytes, int count) {
        const uint8_t* rows[kOutputs];
        for (int n = 0; n < kOutputs; ++n) rows[n] = n < count ? w + n * row_bytes : kZeroBlock;
        for (int j = 0; j < blocks; ++j) {
            for (int n = 0; n < kOutputs; ++n) d[j][n] = half_to_float(rows[n] + bytes_per_block * j);
            for (int half = 0; half < 2; ++half) {
                __m256i words[8];
                simd::transpose_words(rows + 8 * half, bytes_per_block * j + 2, words);
                for (int t = 0; t < 8; ++t) simd::store_signed_quad_half(codes[8 * j + t], half, words[t]);
            }
        }
    }
};

// y[r] (a tile's outputs side by side) += the products of activation rows first + r, r < R, with this super-block of
// each group (index b of the rows' super-blocks). Not inlined (nor the Q8_0 form): inlined into dot, their registers
// spilled (avx512, Q8_0 at 4 rows: 1.7x the time).
template <int64_t type, int R, int G>
__attribute__((noinline)) void accumulate_rows(const Step<type> (&steps)[G], int64_t b, const Quantized& x,
                                               int64_t k, int64_t first, float (*y)[kTileOutputs]) {
    using S = Step<type>;
    constexpr int quads = S::width / 4;
    const int8_t* q[R];
    simd::I16 dots[R][G];
    for (int r = 0; r < R; ++r) {
        q[r] = x.q.data() + (first + r) * k + b * 256;
        for (int g = 0; g < G; ++g) dots[r][g] = simd::izero();
    }
    for (int j = 0; j < S::subs; ++j) {
        const int8_t* sub_block[R];
        for (int r = 0; r < R; ++r) sub_block[r] = q[r] + j * S::width;
        const uint8_t* codes[G];
        const int16_t* scales[G];
        for (int g = 0; g < G; ++g) {
            codes[g] = steps[g].codes[j * quads][0];
            scales[g] = steps[g].scales[j][0];
        }
        simd::scaled_quads<quads, S::group, R, G>(dots, codes, sub_block, scales);
    }
    for (int r = 0; r < R; ++r) {
        const int64_t row = first + r;
        const int16_t* sums = type == Q6_K ? x.sums.data() + row * (k / 16) + 16 * b : x.sums32.data() + row * (k / 32) + 8 * b;
        const float dx = x.d[row * (k / 256) + b];
        for (int g = 0; g < G; ++g) {
            simd::I16 offsets = simd::izero();
            for (int i = 0; i < S::subs / 2; ++i) {
                int32_t pair;
                std::memcpy(&pair, sums + 2 * i, 4);
                offsets = simd::dot2(offsets, simd::load_pairs(steps[g].offsets[i][0]), pair);
            }
            float* out = y[r] + kOutputs * g;
            simd::F16 sum = simd::fmadd(simd::to_float(dots[r][g]), simd::mul(simd::load(steps[g].d), simd::set1(dx)),
                                        simd::load(out));
            sum = simd::fmadd(simd::to_float(offsets), simd::mul(simd::load(steps[g].offset_scale), simd::set1(-dx)), sum);
            simd::store(out, sum);
        }
    }
}

// The same for Q8_0: per block, the rows' exact dots times d dx, added in fp32.
template <int R, int G>
__attribute__((noinline)) void accumulate_blocks32(const Step<Q8_0> (&steps)[G], int64_t b, const Quantized& x,
                                                   int64_t k, int64_t first, float (*y)[kTileOutputs]) {
    const int8_t* q[R];
    const float* dx[R];
    const int16_t* sums[R];
    simd::F16 acc[R][G];
    for (int r = 0; r < R; ++r) {
        const int64_t row = first + r, at = row * (k / 32) + Step<Q8_0>::blocks * b;
        q[r] = x.q.data() + row * k + b * 256;
        dx[r] = x.d.data() + at;
        sums[r] = x.sums32.data() + at;
        for (int g = 0; g < G; ++g) acc[r][g] = simd::load(y[r] + kOutputs * g);
    }
    for (int j = 0; j < Step<Q8_0>::blocks; ++j) {
        const int8_t* block[R];
        int32_t block_sums[R];
        simd::I16 dots[R][G];
        for (int r = 0; r < R; ++r) {
            block[r] = q[r] + 32 * j;
            block_sums[r] = sums[r][j];
        }
        const uint8_t* codes[G];
        for (int g = 0; g < G; ++g) codes[g] = steps[g].codes[8 * j];
        simd::signed_quads<8, R, G>(dots, codes, block, block_sums);
        for (int g = 0; g < G; ++g) {
            const simd::F16 d = simd::load(steps[g].d[j]);
            for (int r = 0; r < R; ++r)
                acc[r][g] = simd::fmadd(simd::to_float(dots[r][g]), simd::mul(d, simd::set1(dx[r][j])), acc[r][g]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) simd::store(y[r] + kOutputs * g, acc[r][g]);
}

// The same for activation rows first .. first + rows - 1, R at a time, then the few left fewer at a time.
template <int64_t type, int G, int R = kRows>
void accumulate(const Step<type> (&steps)[G], int64_t b, const Quantized& x, int64_t k, int64_t first, int rows,
                float (*y)[kTileOutputs]) {
    int r = 0;
    for (; r + R <= rows; r += R) {
        if constexpr (type == Q8_0) {
            accumulate_blocks32<R, G>(steps, b, x, k, first + r, y + r);
        } else {
            accumulate_rows<type, R, G>(steps, b, x, k, first + r, y + r);
        }
    }
    if constexpr (R > 1) {
        if (r < rows) accumulate<type, G, R / 2>(steps, b, x, k, first + r, rows - r, y + r);
    }
}

// y[r] for activation rows first .. first + rows - 1 (rows <= kChunk) of `count` <= 16 G weight rows at w; `next`:
// the rows after these (the next tile's), requested into L2 a share per super-block, in kShares parts between the
// rows' products (requested at once, a share's lines found the queues to memory full: 16 rows of a Q4_K matrix
// read from memory took 20-30% longer than from cache, now ~10%).
template <int64_t type, int G>
void dot(const uint8_t* w, int64_t row_bytes, int count, int64_t k, const Quantized& quantized, int64_t first,
         int rows, const uint8_t* next, float (*y)[kTileOutputs]) {
    constexpr int kShares = 4;
    thread_local Step<type> steps[G];
    const int64_t share = kOutputs * G * step_bytes(type), part = (share / 64 + kShares - 1) / kShares * 64;
    const int unit = rows >= kShares * kRows ? kRows : 2;  // rows split between the parts this many at a time
    const int units = (rows + unit - 1) / unit;
    for (int r = 0; r < rows; ++r)
        for (int g = 0; g < G; ++g) simd::store(y[r] + kOutputs * g, simd::zero());
    for (int64_t b = 0; b < k / 256; ++b) {
        for (int g = 0; g < G; ++g) {
            const int group_count = std::clamp(count - kOutputs * g, 0, kOutputs);
            steps[g].decode(group_count ? w + kOutputs * g * row_bytes + b * step_bytes(type) : kZeroBlock, row_bytes,
                            group_count);
        }
        for (int i = 0; i < kShares; ++i) {
            simd::prefetch_to_l2(next + b * share + i * part, std::min<int64_t>(part, share - i * part));
            const int r0 = std::min(rows, unit * (units * i / kShares));
            const int r1 = std::min(rows, unit * (units * (i + 1) / kShares));
            accumulate(steps, b, quantized, k, first + r0, r1 - r0, y + r0);
        }
    }
}

template <int64_t type>
void dot_groups(int groups, const uint8_t* w, int64_t row_bytes, int count, int64_t k, const Quantized& quantized,
                int64_t first, int rows, const uint8_t* next, float (*y)[kTileOutputs]) {
    if (groups == kGroups) {
        dot<type, kGroups>(w, row_bytes, count, k, quantized, first, rows, next, y);
    } else {
        dot<type, 1>(w, row_bytes, count, k, quantized, first, rows, next, y);
    }
}

// dot over `groups` (1 or kGroups: groups(rows)) Steps of the matrix's type.
void dot_type(int64_t type, int groups, const uint8_t* w, int64_t row_bytes, int count, int64_t k,
              const Quantized& quantized, int64_t first, int rows, const uint8_t* next, float (*y)[kTileOutputs]) {
    switch (type) {
        case Q4_K: dot_groups<Q4_K>(groups, w, row_bytes, count, k, quantized, first, rows, next, y); break;
        case Q5_K: dot_groups<Q5_K>(groups, w, row_bytes, count, k, quantized, first, rows, next, y); break;
        case Q8_0: dot_groups<Q8_0>(groups, w, row_bytes, count, k, quantized, first, rows, next, y); break;
        default: dot_groups<Q6_K>(groups, w, row_bytes, count, k, quantized, first, rows, next, y); break;
    }
}

}  // namespace lanes
