// Quantizing fp32 matrices to GGUF blocks while a checkpoint loads (--quantization q4_k): llama.cpp's reference
// Q4_K quantizer without an importance matrix (quantize_row_q4_K_ref), written again here. Per sub-block of 32, a
// scale and a min fitted by weighted least squares over 21 candidate grids (weights |x| + rms); the 8 scales and
// mins of a super-block of 256 rounded to 6 bits against its fp16 d and dmin; the codes rounded to nearest (ties to
// even, as llama.cpp's nearest_int) against the rounded scales. Scalar code in llama.cpp's order of operations, so
// the bytes are llama-quantize's: no fused multiply-adds (C++ contracts a * b + c by default; llama.cpp's C does not).
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int SUPER = 256, SUB = 32, Q4_K_BYTES = 144;

inline int nearest_int(float value) {  // round half to even, for |value| < 2^22
    float shifted = value + 12582912.f;
    int bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007fffff) - 0x00400000;
}

inline uint16_t to_half(float value) { return _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT); }
inline float from_half(uint16_t value) { return _cvtsh_ss(value); }

// codes in [0, top] for x[0..n) as scale * code - min, fitted to the weights; returns the scale, sets ``min`` (>= 0)
float fit_scale_and_min(const float* x, const float* weights, int n, int top, uint8_t* codes, float* min_out) {
    float low = x[0], high = x[0], sum_w = weights[0], sum_x = weights[0] * x[0];
    for (int i = 1; i < n; ++i) {
        low = std::min(low, x[i]);
        high = std::max(high, x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    low = std::min(low, 0.f);
    if (high == low) {
        std::fill(codes, codes + n, 0);
        *min_out = -low;
        return 0.f;
    }
    float inverse = top / (high - low), scale = 1 / inverse, best = 0;
    for (int i = 0; i < n; ++i) {
        codes[i] = (uint8_t)std::clamp(nearest_int(inverse * (x[i] - low)), 0, top);
        float diff = scale * codes[i] + low - x[i];
        best += weights[i] * (diff * diff);
    }
    uint8_t trial[SUB];
    for (int step = 0; step <= 20; ++step) {
        inverse = (-1.f + 0.1f * step + top) / (high - low);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int code = std::clamp(nearest_int(inverse * (x[i] - low)), 0, top);
            trial[i] = (uint8_t)code;
            sum_l += weights[i] * code;
            sum_l2 += weights[i] * code * code;
            sum_xl += weights[i] * code * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det <= 0) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float error = 0;
        for (int i = 0; i < n; ++i) {
            float diff = this_scale * trial[i] + this_min - x[i];
            error += weights[i] * (diff * diff);
        }
        if (error < best) {
            std::memcpy(codes, trial, n);
            best = error;
            scale = this_scale;
            low = this_min;
        }
    }
    *min_out = -low;
    return scale;
}

// sub-block j's 6-bit scale and min from the 12 packed bytes (sub-blocks 4-7 split over the top bits of 0-7)
inline void scale_and_min(int j, const uint8_t* packed, int* scale, int* min) {
    if (j < 4) {
        *scale = packed[j] & 63;
        *min = packed[j + 4] & 63;
    } else {
        *scale = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        *min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
}

void quantize_super_block(const float* x, uint8_t* block) {
    uint8_t codes[SUPER];
    float weights[SUB], scales[SUPER / SUB], mins[SUPER / SUB], max_scale = 0, max_min = 0;
    for (int j = 0; j < SUPER / SUB; ++j) {
        const float* sub = x + SUB * j;
        float sum_x2 = 0;
        for (int i = 0; i < SUB; ++i) sum_x2 += sub[i] * sub[i];
        float rms = std::sqrt(sum_x2 / SUB);
        for (int i = 0; i < SUB; ++i) weights[i] = rms + std::fabs(sub[i]);
        scales[j] = fit_scale_and_min(sub, weights, SUB, 15, codes + SUB * j, &mins[j]);
        max_scale = std::max(max_scale, scales[j]);
        max_min = std::max(max_min, mins[j]);
    }
    uint8_t* packed = block + 4;
    std::memset(packed, 0, 12);
    float inverse_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inverse_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < SUPER / SUB; ++j) {
        int scale = std::min(63, nearest_int(inverse_scale * scales[j]));
        int min = std::min(63, nearest_int(inverse_min * mins[j]));
        if (j < 4) {
            packed[j] = (uint8_t)scale;
            packed[j + 4] = (uint8_t)min;
        } else {
            packed[j + 4] = (uint8_t)((scale & 0xF) | ((min & 0xF) << 4));
            packed[j - 4] |= (uint8_t)((scale >> 4) << 6);
            packed[j] |= (uint8_t)((min >> 4) << 6);
        }
    }
    uint16_t d = to_half(max_scale / 63.f), dmin = to_half(max_min / 63.f);
    std::memcpy(block, &d, 2);
    std::memcpy(block + 2, &dmin, 2);
    for (int j = 0; j < SUPER / SUB; ++j) {  // the codes again, against the rounded scales
        int scale, min;
        scale_and_min(j, packed, &scale, &min);
        float step = from_half(d) * scale;
        if (step == 0) continue;
        float offset = from_half(dmin) * min;
        for (int i = 0; i < SUB; ++i)
            codes[SUB * j + i] = (uint8_t)std::clamp(nearest_int((x[SUB * j + i] + offset) / step), 0, 15);
    }
    uint8_t* qs = block + 16;  // sub-blocks 2k and 2k + 1 share 32 bytes: low and high nibbles
    for (int j = 0; j < SUPER; j += 64, qs += 32)
        for (int i = 0; i < 32; ++i) qs[i] = (uint8_t)(codes[j + i] | (codes[j + i + 32] << 4));
}

}  // namespace

extern "C" {

// x: [rows, columns] fp32 (columns a multiple of 256) -> out: rows x columns / 256 Q4_K blocks of 144 bytes
void quantize_q4_k(const float* x, int64_t rows, int64_t columns, uint8_t* out, int threads) {
    int64_t blocks = columns / SUPER;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row)
        for (int64_t b = 0; b < blocks; ++b)
            quantize_super_block(x + row * columns + b * SUPER, out + (row * blocks + b) * Q4_K_BYTES);
}

}  // extern "C"
