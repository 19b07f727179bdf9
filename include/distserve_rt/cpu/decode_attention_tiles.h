// fp32 building blocks of the CPU decode attention (decode_attention.h): tile conversion,
// dot products, online softmax and the P.V accumulation, each a loop that GCC and Clang
// vectorise under `#pragma omp simd` with -O3 -march=native (no intrinsics, so any ISA).
// Several are written around what GCC 12 will not vectorise without -ffast-math; the
// comments say which, so a "simplification" does not silently make them scalar again.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "distserve_rt/cpu/dtype.h"
#include "distserve_rt/cpu/fast_math.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace drt::cpu::decode_detail {

using ::drt::cpu::exp_nonpositive;  // fast_math.h

// A [rows, head_dim] tile as fp32: converted into `scratch` once (bf16/fp16), or the cache
// memory itself (fp32), so the group's heads all read fp32 from L1.
template <typename T>
inline const float* tile_as_float(const T* src, int64_t count, float* scratch) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) scratch[i] = to_float(src[i]);
  return scratch;
}
template <>
inline const float* tile_as_float<float>(const float* src, int64_t, float*) {
  return src;
}
// fp16 bits -> float with integer ops and selects only (Giesen's half_to_float_fast5), so
// that the tile conversion vectorises: GCC converts _Float16 one element at a time on CPUs
// without AVX512-FP16. Exact for every input (zeros, subnormals, inf, NaN).
#pragma omp declare simd notinbranch
inline float half_bits_to_float(uint16_t h) {
  constexpr uint32_t kExpMask = 0x7c00u << 13;  // fp16 exponent, shifted to fp32's place
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = em & kExpMask;
  uint32_t u = em + ((127u - 15u) << 23);
  u += exp == kExpMask ? (128u - 16u) << 23 : 0u;  // inf/NaN keep an all-ones exponent
  u += exp == 0 ? 1u << 23 : 0u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  f = exp == 0 ? f - 6.103515625e-05f : f;  // zero/subnormal: renormalise (minus 2^-14)
  std::memcpy(&u, &f, sizeof(u));
  u |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <>
inline const float* tile_as_float<fp16>(const fp16* src, int64_t count, float* scratch) {
  int64_t i = 0;
#if defined(__F16C__)
  // The one intrinsic here: vcvtph2ps converts 8 halves in one instruction, where the
  // portable bit-level version below takes ~12 (fp16 decode was ~45% slower than bf16).
  for (; i + 8 <= count; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(half));
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < count; ++j) scratch[j] = half_bits_to_float(src[j].bits);
  return scratch;
}

// Sum of 16 lanes as a tree: GCC ends `omp simd reduction` loops with a serial chain of
// scalar adds, which made the per-token dot products below latency-bound.
inline float sum16(float* __restrict lanes) {
#pragma omp simd
  for (int l = 0; l < 8; ++l) lanes[l] += lanes[l + 8];
#pragma omp simd
  for (int l = 0; l < 4; ++l) lanes[l] += lanes[l + 4];
  return (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
}
// q . k over dim as 16 partial sums per token, into lanes[0..kTokens): the tokens share each
// load of q and give the FMA units kTokens independent chains.
template <int kTokens, int kDim>
inline void dot_lanes(const float* __restrict q, const float* __restrict k, int64_t dim,
                      float (*__restrict lanes)[16]) {
  const int64_t d_end = kDim > 0 ? kDim : dim - dim % 16;
  for (int64_t d = 0; d < d_end; d += 16) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      const float qv = q[d + l];
      for (int i = 0; i < kTokens; ++i) lanes[i][l] += qv * k[i * dim + d + l];
    }
  }
  for (int64_t d = d_end; d < dim; ++d)  // head_dim not a multiple of 16 (generic path)
    for (int i = 0; i < kTokens; ++i) lanes[i][d % 16] += q[d] * k[i * dim + d];
}

// scores[h, t] = q[h] . k[t] for the group's heads. kDim > 0 (a multiple of 16) fixes
// head_dim at compile time (the fast paths); 0 reads it from `head_dim`.
template <int kDim>
inline void tile_scores(const float* __restrict q, const float* __restrict k, int64_t group,
                        int64_t num_tokens, int64_t head_dim, int64_t score_stride,
                        float* __restrict scores) {
  const int64_t dim = kDim > 0 ? kDim : head_dim;
  for (int64_t h = 0; h < group; ++h) {
    const float* qh = q + h * dim;
    float* sh = scores + h * score_stride;
    int64_t t = 0;
    for (; t + 4 <= num_tokens; t += 4) {
      alignas(64) float lanes[4][16] = {};
      dot_lanes<4, kDim>(qh, k + t * dim, dim, lanes);
      for (int i = 0; i < 4; ++i) sh[t + i] = sum16(lanes[i]);
    }
    for (; t < num_tokens; ++t) {
      alignas(64) float lanes[1][16] = {};
      dot_lanes<1, kDim>(qh, k + t * dim, dim, lanes);
      sh[t] = sum16(lanes[0]);
    }
  }
}

// Online softmax over one chunk of one head's scores: turns them into probabilities relative
// to the new running max and returns the factor the head's accumulator must be rescaled by.
// Rows are chunk-long, so the reductions' scalar epilogues are amortised here.
inline float chunk_softmax(float* __restrict scores, int64_t num_tokens, float& running_max,
                           float& running_sum) {
  float chunk_max = -INFINITY;
#pragma omp simd reduction(max : chunk_max)
  for (int64_t t = 0; t < num_tokens; ++t)
    chunk_max = scores[t] > chunk_max ? scores[t] : chunk_max;
  const float new_max = std::max(running_max, chunk_max);
#pragma omp simd
  for (int64_t t = 0; t < num_tokens; ++t) scores[t] = exp_nonpositive(scores[t] - new_max);
  float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
  for (int64_t t = 0; t < num_tokens; ++t) chunk_sum += scores[t];
  const float rescale = exp_nonpositive(running_max - new_max);
  running_sum = running_sum * rescale + chunk_sum;
  running_max = new_max;
  return rescale;
}

// acc[h] += sum_t probs[h, t] * v[t].
template <int kDim>
inline void tile_accumulate(const float* __restrict probs, const float* __restrict v, int64_t group,
                            int64_t num_tokens, int64_t head_dim, int64_t prob_stride,
                            float* __restrict acc) {
  const int64_t dim = kDim > 0 ? kDim : head_dim;
  for (int64_t h = 0; h < group; ++h) {
    float* ah = acc + h * dim;
    const float* ph = probs + h * prob_stride;
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float p = ph[t];
      const float* vt = v + t * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) ah[d] += p * vt[d];
    }
  }
}

}  // namespace drt::cpu::decode_detail
