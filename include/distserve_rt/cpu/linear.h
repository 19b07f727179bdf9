// CPU linear layer with 16-bit weights: y[M, N] = x[M, K] . W[N, K]^T (+ bias[N]).
//
// Why our own GEMM: on x86 CPUs without native bf16 dot products (AVX2, AVX-512 without
// AVX512_BF16), oneDNN and MKL run bf16 matmuls on a slow generic path (~18 GFLOP/s on two
// Zen cores where fp32 sgemm reaches ~53), and keeping fp32 copies of the weights would
// double their memory. This kernel reads the weights in the checkpoint's 16-bit layout
// (nn.Linear's [out_features, in_features], no repacking), widens them to fp32 in registers
// and accumulates in fp32 with FMA, like the widening dot products of bf16 hardware.
//
// Shape of the computation: dot products along K (both x rows and W rows are K-contiguous),
// a register tile of kMr rows of x times kNr rows of W (kMr * kNr accumulators of 8 floats),
// summed horizontally at the end. x is widened to fp32 once per call (xf, the launcher's per-thread
// buffer). Rows of x are taken in blocks that stay in L2 (kMBlock), and the N dimension is split
// over the OpenMP threads, so each W row is streamed from memory once per x block: at M = 1 the
// kernel runs at memory bandwidth, at M >= kMBlock near the FMA peak.
//
// Results are rounded to the output type once (round to nearest even for bf16), as a bf16
// matmul with fp32 accumulation does. The summation order differs from oneDNN's, so outputs
// may differ from torch's in the last bit.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "distserve_rt/common.h"
#include "distserve_rt/cpu/dtype.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DRT_LINEAR_AVX2 1
#endif

namespace drt::cpu {

struct LinearParams {
  const void* x;       // [M, K] activations, row stride x_row_stride elements
  const void* weight;  // [N, K] contiguous, same dtype as x
  const void* bias;    // [N] same dtype as x, or null
  void* out;           // [M, N] contiguous, out_dtype
  float* xf;           // [M, K] fp32 scratch (x widened), m * k floats
  int64_t m;
  int64_t n;
  int64_t k;
  int64_t x_row_stride;
  bool out_fp32;  // out is float32 (else the dtype of x)
};

constexpr int kLinearMr = 3;     // rows of x per register tile
constexpr int kLinearNr = 4;     // rows of W per register tile
constexpr int64_t kMBlock = 48;  // rows of x per L2-resident block
constexpr int64_t kNChunk = 16;  // rows of W per scheduling unit of a thread

namespace linear_detail {

#ifdef DRT_LINEAR_AVX2
template <typename T>
inline __m256 load8(const T* p);

template <>
inline __m256 load8<bf16>(const bf16* p) {
  // bf16 -> fp32 is the 16 bits moved to the top half of the word.
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <>
inline __m256 load8<fp16>(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kPrefetchStride = 64 / sizeof(uint16_t);  // elements of a cache line

// acc[i][j] = sum_k xf[i, k] * w[j, k] for an MR x NR tile: 8-wide vectors, then the last
// k % 8 elements one by one.
template <typename T, int MR, int NR>
inline void tile(const float* xf, int64_t xf_stride, const T* w, int64_t k, float* acc_out) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = k & ~int64_t{7};
  for (int64_t kk = 0; kk < k8; kk += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xf + i * xf_stride + kk);
    for (int j = 0; j < NR; ++j) {
      // Few x rows: W streams from memory, as NR interleaved rows of only 2 * k bytes each,
      // too short for the hardware prefetcher to ramp up. Prefetch the next tile's rows
      // (the next NR * k elements, contiguous) one cache line per 32 elements.
      if constexpr (MR <= 2) {
        if ((kk & (kPrefetchStride - 1)) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(w + (NR + j) * k + kk), _MM_HINT_T0);
      }
      const __m256 wv = load8(w + j * k + kk);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float sum = hsum(acc[i][j]);
      for (int64_t kk = k8; kk < k; ++kk) sum += xf[i * xf_stride + kk] * to_float(w[j * k + kk]);
      acc_out[i * NR + j] = sum;
    }
}
#else
template <typename T, int MR, int NR>
inline void tile(const float* xf, int64_t xf_stride, const T* w, int64_t k, float* acc_out) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float sum = 0.f;
      for (int64_t kk = 0; kk < k; ++kk) sum += xf[i * xf_stride + kk] * to_float(w[j * k + kk]);
      acc_out[i * NR + j] = sum;
    }
}
#endif

template <typename T, int MR, int NR>
inline void tile_store(const LinearParams& p, int64_t m0, int64_t n0) {
  float acc[MR * NR];
  const T* w = static_cast<const T*>(p.weight) + n0 * p.k;
  tile<T, MR, NR>(p.xf + m0 * p.k, p.k, w, p.k, acc);
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float v = acc[i * NR + j];
      if (bias != nullptr) v += to_float(bias[n0 + j]);
      const int64_t at = (m0 + i) * p.n + n0 + j;
      if (p.out_fp32) {
        static_cast<float*>(p.out)[at] = v;
      } else {
        static_cast<T*>(p.out)[at] = from_float<T>(v);
      }
    }
}

// Rows [m0, m0 + rows) of x times W rows [n0, n1): full MR x NR tiles, then the ragged edges.
template <typename T, int MR>
inline void row_tiles(const LinearParams& p, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kLinearNr <= n1; n += kLinearNr) tile_store<T, MR, kLinearNr>(p, m0, n);
  for (; n < n1; ++n) tile_store<T, MR, 1>(p, m0, n);
}

template <typename T>
inline void chunk(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + kLinearMr <= m1; m += kLinearMr) row_tiles<T, kLinearMr>(p, m, n0, n1);
  if (m1 - m == 2) row_tiles<T, 2>(p, m, n0, n1);
  if (m1 - m == 1) row_tiles<T, 1>(p, m, n0, n1);
}

}  // namespace linear_detail

// T: bf16 or fp16. Preconditions (checked by the launcher): m, n, k >= 1, xf holds m * k
// floats.
//
// Tried and dropped: a BLIS-style outer-product tile (6 x 16, W chunk transposed to fp32
// once per x block) ran at half this kernel's speed on Zen AVX2 (packing alone was 7-50%).
template <typename T>
Status linear(const LinearParams& p) {
  const T* x = static_cast<const T*>(p.x);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.m; ++i) {
      const T* row = x + i * p.x_row_stride;
      float* dst = p.xf + i * p.k;
      for (int64_t kk = 0; kk < p.k; ++kk) dst[kk] = to_float(row[kk]);
    }
    const int64_t num_chunks = (p.n + kNChunk - 1) / kNChunk;
    for (int64_t m0 = 0; m0 < p.m; m0 += kMBlock) {
      const int64_t m1 = std::min(p.m, m0 + kMBlock);
      // Static split: every thread owns the same W rows in every x block (its L2 keeps them
      // when they fit), and no barrier is needed between blocks.
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t n0 = c * kNChunk;
        linear_detail::chunk<T>(p, m0, m1, n0, std::min(p.n, n0 + kNChunk));
      }
    }
  }
  return Status::kOk;
}

}  // namespace drt::cpu
