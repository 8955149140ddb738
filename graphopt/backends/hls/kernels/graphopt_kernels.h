// graphopt's HLS kernel library: integer-only layers for Vitis HLS, and plain C++ for csim.
//
// The arithmetic is graphopt's int8 semantics (graphopt/int8.py), bit for bit:
//   activations  uint8 [0, 255] with a per-tensor zero point
//   weights      int8 [-127, 127], per output channel; bias int32
//   accumulate   acc = bias + sum((x - zx) * w), exact (the accumulator type is wide enough
//                for any input: its width is checked when the project is written)
//   requantize   y = clamp(round_half_even(acc * m0 / 2^shift) + zy, lo, hi), 64-bit product
//   rescale      y = clamp(round_half_even(sum((x_i - z_i) * m_i) / 2^shift) + zy, lo, hi)
// Narrowing always saturates; nothing wraps.
//
// Parallelism: every MAC layer takes REUSE, the number of products each multiplier computes
// per output (per pixel for convolutions): MULT = products / REUSE multipliers run in
// parallel, the REUSE loop is pipelined with II=1. REUSE must divide the product count.
#ifndef GRAPHOPT_KERNELS_H_
#define GRAPHOPT_KERNELS_H_

#include <cmath>
#include <cstdint>

namespace graphopt {

typedef uint8_t act_t;    // an 8-bit activation
typedef int8_t weight_t;  // an 8-bit weight

// round(v / 2^s), ties to even, for s >= 1 (as graphopt.int8.rounding_shift)
inline int64_t rounding_shift(int64_t v, int s) {
#pragma HLS INLINE
    const int64_t floor_ = v >> s;  // arithmetic shift: floor division
    const int64_t rem = v & ((int64_t(1) << s) - 1);
    const int64_t half = int64_t(1) << (s - 1);
    const bool up = rem > half || (rem == half && (floor_ & 1));
    return floor_ + (up ? 1 : 0);
}

inline act_t clamp8(int64_t v, int lo, int hi) {
#pragma HLS INLINE
    return act_t(v < lo ? lo : (v > hi ? hi : v));
}

// Output stage: accumulators -> 8 bits (per-channel fixed-point multiplier).
struct Requantize {
    const int32_t *m0;
    const int32_t *shift;
    int zero_point, lo, hi;
    act_t operator()(int64_t acc, int c) const {
#pragma HLS INLINE
        return clamp8(rounding_shift(acc * m0[c], shift[c]) + zero_point, lo, hi);
    }
};

// Output stage: accumulators -> float (the model's outputs), optionally clamped (ReLU).
struct Dequantize {
    const float *scale;
    bool has_lo, has_hi;
    float lo, hi;
    float operator()(int64_t acc, int c) const {
#pragma HLS INLINE
        float v = float(int32_t(acc)) * scale[c];
        if (has_lo && v < lo) v = lo;
        if (has_hi && v > hi) v = hi;
        return v;
    }
};

// float -> uint8: clamp(round_half_even(x * inv_scale) + zp, 0, 255) in float32
template <int N>
void quantize(const float x[N], act_t y[N], float inv_scale, int zero_point) {
QUANTIZE:
    for (int i = 0; i < N; i++) {
#pragma HLS PIPELINE II = 1
        float v = std::nearbyint(x[i] * inv_scale) + float(zero_point);
        y[i] = act_t(v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v));
    }
}

template <int N>
void dequantize(const act_t x[N], float y[N], float scale, int zero_point) {
DEQUANTIZE:
    for (int i = 0; i < N; i++) {
#pragma HLS PIPELINE II = 1
        y[i] = float(int32_t(x[i]) - zero_point) * scale;
    }
}

// Fully connected: y[o] = stage(b[o] + sum_i (x[i] - zx) * w[o][i], o)
template <class CFG, typename Out, class Stage>
void dense(const act_t x[CFG::n_in], Out y[CFG::n_out], const weight_t w[CFG::n_out * CFG::n_in],
           const int32_t b[CFG::n_out], const Stage &stage) {
    static const int products = CFG::n_in * CFG::n_out;
    static const int mult = products / CFG::reuse;
    typename CFG::acc_t acc[CFG::n_out];
#pragma HLS ARRAY_PARTITION variable = acc complete
#pragma HLS ARRAY_PARTITION variable = w cyclic factor = mult
INIT:
    for (int o = 0; o < CFG::n_out; o++) {
#pragma HLS UNROLL
        acc[o] = b[o];
    }
REUSE:
    for (int r = 0; r < CFG::reuse; r++) {
#pragma HLS PIPELINE II = 1
    MULT:
        for (int m = 0; m < mult; m++) {
            const int k = r * mult + m;
            const int o = k / CFG::n_in, i = k % CFG::n_in;
            acc[o] += (int32_t(x[i]) - CFG::in_zero_point) * int32_t(w[k]);
        }
    }
OUT:
    for (int o = 0; o < CFG::n_out; o++) {
#pragma HLS PIPELINE II = 1
        y[o] = stage(acc[o], o);
    }
}

// 2-D convolution (groups, stride, padding, dilation), input [ci][h][w], output [co][ho][wo],
// weight [co][ci/groups][kh][kw]. Padding reads real zeros: (zx - zx) contributes nothing.
template <class CFG, typename Out, class Stage>
void conv2d(const act_t x[CFG::ci * CFG::h * CFG::w], Out y[CFG::co * CFG::ho * CFG::wo],
            const weight_t w[CFG::co * (CFG::ci / CFG::groups) * CFG::kh * CFG::kw],
            const int32_t b[CFG::co], const Stage &stage) {
    static const int cig = CFG::ci / CFG::groups, cog = CFG::co / CFG::groups;
    static const int k_size = cig * CFG::kh * CFG::kw;  // products per output value
    static const int mult = CFG::co * k_size / CFG::reuse;
    typename CFG::acc_t acc[CFG::co];
#pragma HLS ARRAY_PARTITION variable = acc complete
#pragma HLS ARRAY_PARTITION variable = w cyclic factor = mult
PIXELS:
    for (int p = 0; p < CFG::ho * CFG::wo; p++) {
        const int oh = p / CFG::wo, ow = p % CFG::wo;
    INIT:
        for (int c = 0; c < CFG::co; c++) {
#pragma HLS UNROLL
            acc[c] = b[c];
        }
    REUSE:
        for (int r = 0; r < CFG::reuse; r++) {
#pragma HLS PIPELINE II = 1
        MULT:
            for (int m = 0; m < mult; m++) {
                const int k = r * mult + m;
                const int c = k / k_size, rem = k % k_size;
                const int cin = (c / cog) * cig + rem / (CFG::kh * CFG::kw);
                const int ih = oh * CFG::sh - CFG::ph + ((rem / CFG::kw) % CFG::kh) * CFG::dh;
                const int iw = ow * CFG::sw - CFG::pw + (rem % CFG::kw) * CFG::dw;
                if (ih >= 0 && ih < CFG::h && iw >= 0 && iw < CFG::w) {
                    acc[c] += (int32_t(x[(cin * CFG::h + ih) * CFG::w + iw]) - CFG::in_zero_point) *
                              int32_t(w[k]);
                }
            }
        }
    OUT:
        for (int c = 0; c < CFG::co; c++) {
#pragma HLS PIPELINE II = 1
            y[(c * CFG::ho + oh) * CFG::wo + ow] = stage(acc[c], c);
        }
    }
}

// Max pool on the 8-bit values (exact: max commutes with the monotone dequantize);
// padded positions are skipped, as PyTorch pads with -inf.
template <class CFG>
void maxpool2d(const act_t x[CFG::c * CFG::h * CFG::w], act_t y[CFG::c * CFG::ho * CFG::wo]) {
POOL:
    for (int i = 0; i < CFG::c * CFG::ho * CFG::wo; i++) {
#pragma HLS PIPELINE II = CFG::kh * CFG::kw
        const int c = i / (CFG::ho * CFG::wo), oh = (i / CFG::wo) % CFG::ho, ow = i % CFG::wo;
        act_t best = 0;  // every window holds at least one real value, and values are >= 0
        for (int kh = 0; kh < CFG::kh; kh++) {
            for (int kw = 0; kw < CFG::kw; kw++) {
                const int ih = oh * CFG::sh - CFG::ph + kh, iw = ow * CFG::sw - CFG::pw + kw;
                if (ih >= 0 && ih < CFG::h && iw >= 0 && iw < CFG::w) {
                    const act_t v = x[(c * CFG::h + ih) * CFG::w + iw];
                    best = v > best ? v : best;
                }
            }
        }
        y[i] = best;
    }
}

// Average pool: window sums of (x - zx), padding counted as zeros (count_include_pad),
// then the output stage with the scale in_scale / (kh * kw) / out_scale.
template <class CFG, typename Out, class Stage>
void avgpool2d(const act_t x[CFG::c * CFG::h * CFG::w], Out y[CFG::c * CFG::ho * CFG::wo],
               const Stage &stage) {
POOL:
    for (int i = 0; i < CFG::c * CFG::ho * CFG::wo; i++) {
#pragma HLS PIPELINE II = CFG::kh * CFG::kw
        const int c = i / (CFG::ho * CFG::wo), oh = (i / CFG::wo) % CFG::ho, ow = i % CFG::wo;
        typename CFG::acc_t sum = 0;
        for (int kh = 0; kh < CFG::kh; kh++) {
            for (int kw = 0; kw < CFG::kw; kw++) {
                const int ih = oh * CFG::sh - CFG::ph + kh, iw = ow * CFG::sw - CFG::pw + kw;
                if (ih >= 0 && ih < CFG::h && iw >= 0 && iw < CFG::w) {
                    sum += int32_t(x[(c * CFG::h + ih) * CFG::w + iw]) - CFG::in_zero_point;
                }
            }
        }
        y[i] = stage(sum, 0);
    }
}

// y = clamp(round(((a - za) * ma + (b - zb) * mb) / 2^shift) + zy, lo, hi)
template <int N>
void add(const act_t a[N], const act_t b[N], act_t y[N], int za, int32_t ma, int zb, int32_t mb,
         int shift, int zy, int lo, int hi) {
ADD:
    for (int i = 0; i < N; i++) {
#pragma HLS PIPELINE II = 1
        const int64_t v = int64_t(int32_t(a[i]) - za) * ma + int64_t(int32_t(b[i]) - zb) * mb;
        y[i] = clamp8(rounding_shift(v, shift) + zy, lo, hi);
    }
}

// One tensor to another scale (also each part of a concat, written at `y + offset`).
template <int N>
void rescale(const act_t x[N], act_t y[N], int zx, int32_t m, int shift, int zy, int lo, int hi) {
RESCALE:
    for (int i = 0; i < N; i++) {
#pragma HLS PIPELINE II = 1
        y[i] = clamp8(rounding_shift(int64_t(int32_t(x[i]) - zx) * m, shift) + zy, lo, hi);
    }
}

template <int N>
void clamp(const act_t x[N], act_t y[N], int lo, int hi) {
CLAMP:
    for (int i = 0; i < N; i++) {
#pragma HLS PIPELINE II = 1
        y[i] = clamp8(x[i], lo, hi);
    }
}

}  // namespace graphopt

#endif  // GRAPHOPT_KERNELS_H_
