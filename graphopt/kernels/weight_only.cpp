// Weight-only quantized linear layers on the CPU: y = x @ dequantize(w).T + bias.
//
// The weights stay int8 (one scale per output channel) or int4 (a scale and a zero point per
// group of input channels) in memory and are widened to float32 in registers, next to the
// multiply-add: a batch-1 decode step reads each weight once, so its speed is the bytes per
// weight. Activations and accumulation stay float32. With AVX-512 the kernels are written
// with its intrinsics; elsewhere the loops are written for the compiler to vectorize (`omp
// simd` reductions). Built with -O3 -march=native for this CPU; rows of the weight are split
// across threads with ATen's pool.
//
// Layouts (graphopt/quantized_linear.py makes them; the reference implementation there is the
// definition these kernels are tested against):
//   int8: w int8 [N, K], scale float32 [N];
//         or tiled, w int8 [N / 4, K / 64, 4, 64]: four rows' chunks of 64 input channels one
//         after another (`tile_int8`), so that a GEMV reads the weight as one sequential stream.
//         Reading four rows side by side from the [N, K] layout is four streams a row apart,
//         which the hardware prefetchers follow at about half the bandwidth one stream gets
//         (`python -m benchmarks.llm --kernels-only` times both).
//   int4: w uint8 [N, K / 2]; each block of 32 input channels k0..k0+31 is 16 bytes, byte j
//         holding channel k0 + j in its low nibble and k0 + 16 + j in its high one;
//         scale, zero float32 [N, K / group]: w[n, k] = (q - zero) * scale of k's group.
// Large batches (prefill) dequantize blocks of rows and call ATen's GEMM instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;         // weight rows per pass: each x load feeds four rows
constexpr int64_t kGemvMaxBatch = 32;  // up to this many rows of x: the GEMV kernels, in
constexpr int64_t kBatchChunk = 8;     // chunks of this many rows of x (their accumulators
constexpr int64_t kRowBlock = 64;      // fill the registers), over blocks of this many weight
                                       // rows (they stay in cache from one chunk to the next)
constexpr int64_t kDequantRows = 256; // above it: dequantize this many weight rows per GEMM
constexpr int64_t kTileRows = 4;      // the tiled int8 layout: 4 rows x 64 input channels
constexpr int64_t kTileK = 64;

#if defined(__AVX512F__)
// AVX-512 GEMV kernels, one template per batch size M (1..8) so the accumulators stay in
// registers: R weight rows at a time, each 16 weights widened to float32 once and multiplied
// into all M rows of x. Two accumulators per (row, m) for the two halves of a 32-channel step.
// Each row's bytes are prefetched kPrefetch ahead: with four rows read side by side, the
// hardware prefetchers alone leave the int4 kernel well short of the memory's bandwidth
// (`python -m benchmarks.llm --kernels-only` times the kernels on weights read from memory).
constexpr int64_t kPrefetch = 256;

template <int M, int R>
void gemv_int8_avx512(const float* x, const int8_t* w, const float* scale, float* y,
                      int64_t k_count, int64_t n_count, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 lo[R][M], hi[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) lo[r][m] = hi[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= k_count; k += 32) {
      for (int r = 0; r < R; ++r) {
        const int8_t* wr = w + (n + r) * k_count + k;
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch), _MM_HINT_T0);
        const __m512 w0 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr))));
        const __m512 w1 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16))));
        for (int m = 0; m < M; ++m) {
          lo[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * k_count + k), w0, lo[r][m]);
          hi[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * k_count + k + 16), w1, hi[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + (n + r) * k_count;
      for (int m = 0; m < M; ++m) {
        float acc = _mm512_reduce_add_ps(_mm512_add_ps(lo[r][m], hi[r][m]));
        for (int64_t t = k; t < k_count; ++t) acc += x[m * k_count + t] * wr[t];
        y[m * n_count + n + r] = acc * scale[n + r];
      }
    }
  }
  if (n < n1) gemv_int8_avx512<M, 1>(x, w, scale, y, k_count, n_count, n, n1);
}

// Tiled int8 (see the layouts above): each 64-byte load is one tile row's 64 channels; the
// tile's four rows are multiplied into M rows of x (M <= 4) as the weight streams by.
// Two accumulators per (row, m) at M = 1 keep eight multiply-adds in flight.
template <int M>
void gemv_int8_tiles_avx512(const float* x, const int8_t* w, const float* scale, float* y,
                            int64_t k_count, int64_t n_count, int64_t n0, int64_t n1) {
  constexpr int A = M == 1 ? 2 : 1;
  for (int64_t n = n0; n < n1; n += kTileRows) {
    __m512 acc[kTileRows][M][A];
    for (int r = 0; r < kTileRows; ++r)
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) acc[r][m][a] = _mm512_setzero_ps();
    const int8_t* wt = w + n * k_count;
    for (int64_t k = 0; k < k_count; k += kTileK, wt += kTileRows * kTileK) {
      for (int r = 0; r < kTileRows; ++r) {
        const __m512i v = _mm512_loadu_si512(wt + r * kTileK);
        __m512 q[4];
        q[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v)));
        q[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1)));
        q[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2)));
        q[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3)));
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < 4; ++j)
            acc[r][m][j % A] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * k_count + k + 16 * j), q[j],
                                               acc[r][m][j % A]);
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int m = 0; m < M; ++m) {
        __m512 sum = acc[r][m][0];
        if (A == 2) sum = _mm512_add_ps(sum, acc[r][m][A - 1]);
        y[m * n_count + n + r] = _mm512_reduce_add_ps(sum) * scale[n + r];
      }
  }
}

// int4: a 16-byte load is 32 channels (low nibbles, then high ones). Within a group the dot
// products accumulate unscaled; at the group's end they are scaled into the total, and the
// zero points' part, zero * scale * (sum of x over the group), is subtracted at the end.
template <int M, int R>
void gemv_int4_avx512(const float* x, const float* xsum, const uint8_t* w, const float* scale,
                      const float* zero, float* y, int64_t k_count, int64_t n_count,
                      int64_t group, int64_t n0, int64_t n1) {
  const int64_t groups = k_count / group, row_bytes = k_count / 2;
  const __m512i low4 = _mm512_set1_epi32(15);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 total[R][M];
    float offset[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) total[r][m] = _mm512_setzero_ps(), offset[r][m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 lo[R][M], hi[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) lo[r][m] = hi[r][m] = _mm512_setzero_ps();
      for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
        for (int r = 0; r < R; ++r) {
          const uint8_t* wr = w + (n + r) * row_bytes + b / 2;
          _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch), _MM_HINT_T0);
          const __m512i v =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr)));
          const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, low4));
          const __m512 q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
          for (int m = 0; m < M; ++m) {
            lo[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * k_count + b), q0, lo[r][m]);
            hi[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * k_count + b + 16), q1, hi[r][m]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const float s = scale[(n + r) * groups + g];
        const float sz = s * zero[(n + r) * groups + g];
        const __m512 sv = _mm512_set1_ps(s);
        for (int m = 0; m < M; ++m) {
          total[r][m] = _mm512_fmadd_ps(sv, _mm512_add_ps(lo[r][m], hi[r][m]), total[r][m]);
          offset[r][m] += sz * xsum[m * groups + g];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        y[m * n_count + n + r] = _mm512_reduce_add_ps(total[r][m]) - offset[r][m];
  }
  if (n < n1) gemv_int4_avx512<M, 1>(x, xsum, w, scale, zero, y, k_count, n_count, group, n, n1);
}

// Rows per pass: enough independent accumulators to hide the multiply-add latency, few
// enough that they and the x loads fit the 32 vector registers.
#define GRAPHOPT_BY_BATCH(CALL) \
  switch (mb) {                 \
    case 1: CALL(1, 4); break;  \
    case 2: CALL(2, 4); break;  \
    case 3: CALL(3, 2); break;  \
    case 4: CALL(4, 2); break;  \
    case 5: CALL(5, 1); break;  \
    case 6: CALL(6, 1); break;  \
    case 7: CALL(7, 1); break;  \
    default: CALL(8, 1); break; \
  }
#endif  // __AVX512F__

void check_common(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, ": the weight must be contiguous");
}

at::Tensor output_for(const at::Tensor& x, int64_t n) {
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return at::empty(sizes, x.options());
}

void add_bias(at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) y.add_(*bias);
}

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], rows n in [n0, n1).
void gemv_int8(const float* x, const int8_t* w, const float* scale, float* y, int64_t m_count,
               int64_t k_count, int64_t n_count, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < m_count; ++m) {
    const float* xm = x + m * k_count;
    float* ym = y + m * n_count;
    int64_t n = n0;
    for (; n + kRows <= n1; n += kRows) {
      const int8_t* w0 = w + n * k_count;
      const int8_t* w1 = w0 + k_count;
      const int8_t* w2 = w1 + k_count;
      const int8_t* w3 = w2 + k_count;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < k_count; ++k) {
        const float v = xm[k];
        a0 += v * static_cast<float>(w0[k]);
        a1 += v * static_cast<float>(w1[k]);
        a2 += v * static_cast<float>(w2[k]);
        a3 += v * static_cast<float>(w3[k]);
      }
      ym[n] = a0 * scale[n];
      ym[n + 1] = a1 * scale[n + 1];
      ym[n + 2] = a2 * scale[n + 2];
      ym[n + 3] = a3 * scale[n + 3];
    }
    for (; n < n1; ++n) {
      const int8_t* wn = w + n * k_count;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < k_count; ++k) a += xm[k] * static_cast<float>(wn[k]);
      ym[n] = a * scale[n];
    }
  }
}

// Tiled int8 without AVX-512: the same order of reads, loops for the compiler to vectorize.
void gemv_int8_tiles(const float* x, const int8_t* w, const float* scale, float* y,
                     int64_t m_count, int64_t k_count, int64_t n_count, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kTileRows) {
    for (int64_t m = 0; m < m_count; ++m) {
      const float* xm = x + m * k_count;
      float acc[kTileRows] = {0.f, 0.f, 0.f, 0.f};
      const int8_t* wt = w + n * k_count;
      for (int64_t k = 0; k < k_count; k += kTileK, wt += kTileRows * kTileK) {
        for (int r = 0; r < kTileRows; ++r) {
          const int8_t* wr = wt + r * kTileK;
          float a = 0.f;
#pragma omp simd reduction(+ : a)
          for (int64_t j = 0; j < kTileK; ++j) a += xm[k + j] * static_cast<float>(wr[j]);
          acc[r] += a;
        }
      }
      for (int r = 0; r < kTileRows; ++r) y[m * n_count + n + r] = acc[r] * scale[n + r];
    }
  }
}

// One int4 row's dot products with x, group by group: sum over groups of
// scale_g * (sum_k x_k q_k - zero_g * sum_k x_k), with sum_k x_k per group precomputed.
inline float dot_int4_row(const float* xm, const float* xsum, const uint8_t* wn,
                          const float* scale, const float* zero, int64_t k_count, int64_t group) {
  float total = 0.f;
  const int64_t groups = k_count / group;
  for (int64_t g = 0; g < groups; ++g) {
    float acc = 0.f;
    for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
      const uint8_t* bytes = wn + b / 2;
      const float* xb = xm + b;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < 16; ++j) {
        acc += xb[j] * static_cast<float>(bytes[j] & 15) +
               xb[16 + j] * static_cast<float>(bytes[j] >> 4);
      }
    }
    total += scale[g] * (acc - zero[g] * xsum[g]);
  }
  return total;
}

void gemv_int4(const float* x, const float* xsum, const uint8_t* w, const float* scale,
               const float* zero, float* y, int64_t m_count, int64_t k_count, int64_t n_count,
               int64_t group, int64_t n0, int64_t n1) {
  const int64_t groups = k_count / group;
  for (int64_t m = 0; m < m_count; ++m) {
    const float* xm = x + m * k_count;
    const float* sm = xsum + m * groups;
    for (int64_t n = n0; n < n1; ++n) {
      y[m * n_count + n] = dot_int4_row(xm, sm, w + n * (k_count / 2), scale + n * groups,
                                        zero + n * groups, k_count, group);
    }
  }
}

// Rows n0..n1 of an int8 weight in float32, from either layout (tiled: n0, n1 whole tiles).
at::Tensor dequantize_int8_rows(const at::Tensor& w, const at::Tensor& scale, int64_t n0,
                                int64_t n1) {
  auto rows = w.dim() == 2 ? w.slice(0, n0, n1)
                           : w.slice(0, n0 / kTileRows, (n1 + kTileRows - 1) / kTileRows)
                                 .permute({0, 2, 1, 3})
                                 .reshape({n1 - n0, -1});
  return rows.to(at::kFloat).mul_(scale.slice(0, n0, n1).unsqueeze(1));
}

at::Tensor dequantize_int4_rows(const at::Tensor& w, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t group, int64_t n0, int64_t n1) {
  const int64_t rows = n1 - n0, k_count = w.size(1) * 2;
  auto bytes = w.slice(0, n0, n1).view({rows, k_count / 32, 16});
  auto low = at::bitwise_and(bytes, 15), high = at::bitwise_right_shift(bytes, 4);
  auto q = at::cat({low, high}, 2).view({rows, k_count / group, group}).to(at::kFloat);
  auto z = zero.slice(0, n0, n1).unsqueeze(2), s = scale.slice(0, n0, n1).unsqueeze(2);
  return q.sub_(z).mul_(s).view({rows, k_count});
}

// Large batches: y[:, n0:n1] = x @ dequantize(rows n0..n1).T, block by block.
template <typename Dequantize>
void gemm_by_blocks(const at::Tensor& x2, at::Tensor& y2, int64_t n_count, Dequantize rows) {
  for (int64_t n0 = 0; n0 < n_count; n0 += kDequantRows) {
    const int64_t n1 = std::min(n_count, n0 + kDequantRows);
    auto out = y2.slice(1, n0, n1);
    at::mm_out(out, x2, rows(n0, n1).t());
  }
}

// Runs kernel(m0, mb, n0, n1) over every chunk of x rows [m0, m0 + mb) and weight rows
// [n0, n1), weight rows split across threads in blocks, each block reused by every chunk.
template <typename Kernel>
void by_blocks(int64_t m_count, int64_t n_count, const Kernel& kernel) {
  at::parallel_for(0, (n_count + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock, n1 = std::min(n_count, n0 + kRowBlock);
      for (int64_t m0 = 0; m0 < m_count; m0 += kBatchChunk)
        kernel(m0, std::min(kBatchChunk, m_count - m0), n0, n1);
    }
  });
}

at::Tensor linear_int8_weight(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias) {
  check_common(x, w, "graphopt::linear_int8_weight");
  TORCH_CHECK(w.scalar_type() == at::kChar, "linear_int8_weight: weight must be int8");
  const bool tiled = w.dim() == 4;
  TORCH_CHECK(w.dim() == 2 || (tiled && w.size(2) == kTileRows && w.size(3) == kTileK),
              "linear_int8_weight: weight must be [N, K] or tiled [N/4, K/64, 4, 64], got ",
              w.sizes());
  const int64_t n_count = tiled ? w.size(0) * kTileRows : w.size(0);
  const int64_t k_count = tiled ? w.size(1) * kTileK : w.size(1);
  TORCH_CHECK(x.size(-1) == k_count, "linear_int8_weight: x has ", x.size(-1),
              " input channels, the weight ", k_count);
  auto xc = x.contiguous();
  auto sc = scale.to(at::kFloat).contiguous();
  auto y = output_for(x, n_count);
  const int64_t m_count = k_count ? xc.numel() / k_count : 0;
  auto x2 = xc.view({m_count, k_count});
  auto y2 = y.view({m_count, n_count});
  if (m_count <= kGemvMaxBatch) {
    const float* xp = xc.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = sc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    by_blocks(m_count, n_count, [&](int64_t m0, int64_t mb, int64_t n0, int64_t n1) {
      const float* xm = xp + m0 * k_count;
      float* ym = yp + m0 * n_count;
#if defined(__AVX512F__)
      if (tiled) {
        for (int64_t c = 0; c < mb; c += 4) {  // x rows by fours over the same (cached) tiles
          const float* xc4 = xm + c * k_count;
          float* yc4 = ym + c * n_count;
          switch (std::min<int64_t>(4, mb - c)) {
            case 1: gemv_int8_tiles_avx512<1>(xc4, wp, sp, yc4, k_count, n_count, n0, n1); break;
            case 2: gemv_int8_tiles_avx512<2>(xc4, wp, sp, yc4, k_count, n_count, n0, n1); break;
            case 3: gemv_int8_tiles_avx512<3>(xc4, wp, sp, yc4, k_count, n_count, n0, n1); break;
            default: gemv_int8_tiles_avx512<4>(xc4, wp, sp, yc4, k_count, n_count, n0, n1);
          }
        }
        return;
      }
#define GRAPHOPT_INT8(M, R) gemv_int8_avx512<M, R>(xm, wp, sp, ym, k_count, n_count, n0, n1)
      GRAPHOPT_BY_BATCH(GRAPHOPT_INT8)
#undef GRAPHOPT_INT8
#else
      if (tiled) {
        gemv_int8_tiles(xm, wp, sp, ym, mb, k_count, n_count, n0, n1);
        return;
      }
      gemv_int8(xm, wp, sp, ym, mb, k_count, n_count, n0, n1);
#endif
    });
  } else {
    gemm_by_blocks(x2, y2, n_count,
                   [&](int64_t n0, int64_t n1) { return dequantize_int8_rows(w, sc, n0, n1); });
  }
  add_bias(y, bias);
  return y;
}

at::Tensor linear_int4_weight(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                              const at::Tensor& zero, int64_t group,
                              const c10::optional<at::Tensor>& bias) {
  check_common(x, w, "graphopt::linear_int4_weight");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2,
              "linear_int4_weight: weight must be uint8 [N, K/2] (packed), got ", w.scalar_type(),
              " ", w.sizes());
  const int64_t n_count = w.size(0), k_count = w.size(1) * 2;
  TORCH_CHECK(group % 32 == 0 && k_count % group == 0,
              "linear_int4_weight: group size must be a multiple of 32 dividing ", k_count);
  TORCH_CHECK(x.size(-1) == k_count, "linear_int4_weight: x has ", x.size(-1),
              " input channels, the weight ", k_count);
  auto xc = x.contiguous();
  auto sc = scale.to(at::kFloat).contiguous(), zc = zero.to(at::kFloat).contiguous();
  auto y = output_for(x, n_count);
  const int64_t m_count = k_count ? xc.numel() / k_count : 0;
  auto x2 = xc.view({m_count, k_count});
  auto y2 = y.view({m_count, n_count});
  if (m_count <= kGemvMaxBatch) {
    auto xsum = x2.view({m_count, k_count / group, group}).sum(2).contiguous();
    const float* xp = xc.data_ptr<float>();
    const float* xs = xsum.data_ptr<float>();
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const float* sp = sc.data_ptr<float>();
    const float* zp = zc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t groups = k_count / group;
    by_blocks(m_count, n_count, [&](int64_t m0, int64_t mb, int64_t n0, int64_t n1) {
      const float* xm = xp + m0 * k_count;
      const float* xsm = xs + m0 * groups;
      float* ym = yp + m0 * n_count;
#if defined(__AVX512F__)
#define GRAPHOPT_INT4(M, R) \
  gemv_int4_avx512<M, R>(xm, xsm, wp, sp, zp, ym, k_count, n_count, group, n0, n1)
      GRAPHOPT_BY_BATCH(GRAPHOPT_INT4)
#undef GRAPHOPT_INT4
#else
      gemv_int4(xm, xsm, wp, sp, zp, ym, mb, k_count, n_count, group, n0, n1);
#endif
    });
  } else {
    gemm_by_blocks(x2, y2, n_count, [&](int64_t n0, int64_t n1) {
      return dequantize_int4_rows(w, sc, zc, group, n0, n1);
    });
  }
  add_bias(y, bias);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(graphopt, CPU, m) {
  m.impl("linear_int8_weight", &linear_int8_weight);
  m.impl("linear_int4_weight", &linear_int4_weight);
}
