// gated_delta_decode: one token of a Gated DeltaNet layer for each of a step's rows, from the layer's projections to
// the input of its out_proj, on the states where they live (no gather into a batch and back): the gates, the causal
// conv over the stored window and the new input, SiLU, the L2-normalised query and key, the gated delta rule's
// recurrent form, and the gated RMSNorm of each value head.
//
// Per row (its projections at packed index tokens[row]: the conv inputs x then z; the gate inputs b then a):
// y = silu(sum_j taps[j] * window[j]) over the kernel - 1 stored inputs and x, the window shifted by x.
// Per row and value head, with its key head's query q (scaled by key_dim^-1/2) and key k, value v, state S [K, V],
// beta = sigmoid(b), decay g = exp(-A softplus(a + dt_bias)):
//   S' = g S + k (beta (v - g S^T k))^T,   o = S'^T q
// in two passes over S instead of torch's six: the first reads S for a = S^T k and c = S^T q, the second writes
// S' = g S + k d^T with d = beta (v - g a), and o = g c + (k . q) d (S' is never read again). Then
// out = rmsnorm(o) * weight * silu(z), rounded to bf16 where torch rounds in a bf16 model (o, the normalised o,
// its product with the weight, the result). fp32 otherwise; each row and head is computed alone, so nothing depends
// on the rest of the batch.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

using simd::F16;

namespace {

// x * (1 / sqrt(sum x^2 + 1e-6)) * scale into out (the reference's l2norm, then the query's scale)
void l2_normalise(const float* x, int64_t n, float scale, float* out) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
    const float factor = scale / std::sqrt(sum + 1e-6f);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * factor;
}

// the nearest bf16 value (ties to even), as a float
float to_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

// element i of a row of the model's activations (bf16 or fp32)
float element(const void* row, int64_t i, int fp32) {
    if (fp32) return static_cast<const float*>(row)[i];
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(row)[i]) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

F16 load_activations(const void* row, int64_t i, int fp32) {
    return fp32 ? simd::load(static_cast<const float*>(row) + i) : simd::load_bf16(static_cast<const uint16_t*>(row) + i);
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }

float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // torch's threshold

}  // namespace

extern "C" void gated_delta_decode(float* conv_state, float* states, const int64_t* sources, const int64_t* slots,
                                   const int64_t* tokens,
                                   const float* taps, const void* projected, const void* gates,
                                   const float* decay_rate, const float* dt_bias, const float* norm_weight, float eps,
                                   int64_t rows, int64_t kernel, int64_t key_heads, int64_t value_heads,
                                   int64_t key_dim, int64_t value_dim, int tiled, int fp32, float* convolved,
                                   void* out, int threads) {
    const int64_t channels = 2 * key_heads * key_dim + value_heads * value_dim;  // a multiple of 16
    const int64_t value_size = value_heads * value_dim;
    const int64_t width = fp32 ? 4 : 2;  // bytes per activation
    const int64_t lanes = value_dim / 16;  // value_dim is a multiple of 16, at most 512; key_dim at most 512
    const int64_t per_key = value_heads / key_heads;
    const auto projection = [&](int64_t row) {
        return static_cast<const char*>(projected) + tokens[row] * (channels + value_size) * width;
    };
#pragma omp parallel num_threads(threads) if (rows * channels >= 4096)
    {
#pragma omp for schedule(static)
        for (int64_t block = 0; block < rows * (channels / 16); ++block) {
            const int64_t row = block / (channels / 16), c = 16 * (block % (channels / 16));
            const float* window = conv_state + sources[row] * (kernel - 1) * channels;
            float* kept = conv_state + slots[row] * (kernel - 1) * channels;  // may be ``window`` itself
            const F16 input = load_activations(projection(row), c, fp32);
            F16 sum = simd::mul(simd::load(taps + (kernel - 1) * channels + c), input);
            for (int64_t j = 0; j < kernel - 1; ++j) {
                const F16 tap = simd::load(taps + j * channels + c);
                const F16 held = simd::load(window + j * channels + c);
                sum = simd::fmadd(tap, held, sum);
                simd::store(kept + j * channels + c, j + 1 < kernel - 1 ? simd::load(window + (j + 1) * channels + c)
                                                                         : input);
            }
            float lane[16];
            simd::store(lane, sum);
            for (int i = 0; i < 16; ++i) lane[i] = silu(lane[i]);
            simd::store(convolved + row * channels + c, simd::load(lane));
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows * value_heads; ++task) {
            const int64_t row = task / value_heads, head = task % value_heads;
            const int64_t key_head = tiled ? head % key_heads : head / per_key;
            const float* y = convolved + row * channels;
            float qr[512], kr[512], o[512];
            l2_normalise(y + key_head * key_dim, key_dim, 1.0f / std::sqrt((float)key_dim), qr);
            l2_normalise(y + (key_heads + key_head) * key_dim, key_dim, 1.0f, kr);
            const float* vr = y + 2 * key_heads * key_dim + head * value_dim;
            const float* s = states + (sources[row] * value_heads + head) * key_dim * value_dim;
            float* advanced = states + (slots[row] * value_heads + head) * key_dim * value_dim;  // may be ``s``
            const char* gate_row = static_cast<const char*>(gates) + tokens[row] * 2 * value_heads * width;
            const float b = 1.0f / (1.0f + std::exp(-element(gate_row, head, fp32)));
            const float log_decay = -decay_rate[head] * softplus(element(gate_row, value_heads + head, fp32) +
                                                                 dt_bias[head]);
            const float g = std::exp(log_decay);
            F16 a[32], c[32];
            for (int64_t j = 0; j < lanes; ++j) a[j] = c[j] = simd::zero();
            float kq = 0.0f;
            for (int64_t i = 0; i < key_dim; ++i) {
                const F16 ki = simd::set1(kr[i]), qi = simd::set1(qr[i]);
                for (int64_t j = 0; j < lanes; ++j) {
                    const F16 sij = simd::load(s + i * value_dim + 16 * j);
                    a[j] = simd::fmadd(sij, ki, a[j]);
                    c[j] = simd::fmadd(sij, qi, c[j]);
                }
                kq += kr[i] * qr[i];
            }
            const F16 gv = simd::set1(g), bv = simd::set1(b), kqv = simd::set1(kq);
            F16 d[32];
            for (int64_t j = 0; j < lanes; ++j) {
                d[j] = simd::mul(bv, simd::sub(simd::load(vr + 16 * j), simd::mul(gv, a[j])));
                simd::store(o + 16 * j, simd::fmadd(gv, c[j], simd::mul(kqv, d[j])));
            }
            for (int64_t i = 0; i < key_dim; ++i) {
                const F16 ki = simd::set1(kr[i]);
                for (int64_t j = 0; j < lanes; ++j) {
                    const int64_t at = i * value_dim + 16 * j;
                    simd::store(advanced + at, simd::fmadd(gv, simd::load(s + at), simd::mul(ki, d[j])));
                }
            }
            float squares = 0.0f;
            for (int64_t i = 0; i < value_dim; ++i) {
                if (!fp32) o[i] = to_bf16(o[i]);
                squares += o[i] * o[i];
            }
            const float inverse = 1.0f / std::sqrt(squares / (float)value_dim + eps);
            const char* z = projection(row) + (channels + head * value_dim) * width;
            char* target = static_cast<char*>(out) + (tokens[row] * value_size + head * value_dim) * width;
            for (int64_t i = 0; i < value_dim; ++i) {
                const float normed = fp32 ? o[i] * inverse : to_bf16(o[i] * inverse);
                const float weighted = fp32 ? normed * norm_weight[i] : to_bf16(normed * norm_weight[i]);
                const float result = weighted * silu(element(z, i, fp32));
                if (fp32) {
                    reinterpret_cast<float*>(target)[i] = result;
                } else {
                    uint32_t bits;
                    const float rounded = to_bf16(result);
                    std::memcpy(&bits, &rounded, sizeof bits);
                    reinterpret_cast<uint16_t*>(target)[i] = static_cast<uint16_t>(bits >> 16);
                }
            }
        }
    }
}
