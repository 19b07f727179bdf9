// Fused elementwise ops of a decoder layer on CPU: RMSNorm (optionally with the residual add
// before it), SiLU-and-mul, and rotary position embedding from a precomputed cos/sin table.
//
// Each op is one pass over its rows where eager torch makes 4-8 (RMSNorm: upcast, pow, mean,
// rsqrt, two multiplies, downcast). Rounding follows HF transformers' eager modules step by
// step, so bf16 results round exactly as the reference does (up to the order of the sum of
// squares in RMSNorm):
//   rms_norm:      out = T(w * T(x * rsqrt(mean(x^2) + eps)))       (x, mean in fp32)
//   add_rms_norm:  residual = T(x + residual); x = rms_norm(residual)
//   silu_and_mul:  out = T(T(silu(gate)) * up)                       (gate first, then up)
//   rotary (neox): q1' = T(T(q1 * c) - T(q2 * s)), q2' = T(T(q2 * c) + T(q1 * s)),
//                  c, s = T(cos), T(sin) of position * inv_freq (the table, fp32)
// where T() rounds to the tensor's dtype (identity for fp32).
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "distserve_rt/common.h"
#include "distserve_rt/cpu/dtype.h"
#include "distserve_rt/cpu/fast_math.h"

namespace drt::cpu {

template <typename T>
inline float round_to(float x) {
  return to_float(from_float<T>(x));
}

// fp32 -> fp16 -> fp32 must round. GCC 12 on an AVX512-FP16 CPU (-march=native), under GNU
// C++'s -fexcess-precision=fast, folded the two casts into nothing, so rotary's T(cos) and
// T(q * c) kept fp32 (an ulp off the reference in 1 of 4 fp16 elements). The 16-bit pattern
// is forced into a register here, which only a real conversion can fill.
template <>
inline float round_to<fp16>(float x) {
  fp16 h = from_float<fp16>(x);
  asm("" : "+r"(h.bits));
  return to_float(h);
}

// Rows are spread over threads only when there is enough work to pay for waking them.
constexpr int64_t kElementwiseParallelMin = 1 << 14;

struct RMSNormParams {
  void* x;             // [num_tokens, hidden] row stride x_stride; normalised in place when
                       // out == x
  void* residual;      // [num_tokens, hidden] contiguous, or null (no residual add)
  void* out;           // [num_tokens, hidden] contiguous
  const void* weight;  // [hidden]
  int64_t num_tokens;
  int64_t hidden;
  int64_t x_stride;
  float eps;
};

template <typename T>
Status rms_norm(const RMSNormParams& p) {
  T* x = static_cast<T*>(p.x);
  T* residual = static_cast<T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const T* w = static_cast<const T*>(p.weight);
  const int64_t h = p.hidden;
#pragma omp parallel for schedule(static) if (p.num_tokens * h >= kElementwiseParallelMin)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    T* row = x + t * p.x_stride;
    T* src = row;
    if (residual != nullptr) {  // residual = x + residual, then normalise the sum
      T* res = residual + t * h;
      for (int64_t i = 0; i < h; ++i) res[i] = from_float<T>(to_float(row[i]) + to_float(res[i]));
      src = res;
    }
    float sum = 0.f;
    for (int64_t i = 0; i < h; ++i) {
      const float v = to_float(src[i]);
      sum += v * v;
    }
    const float r = 1.f / std::sqrt(sum / static_cast<float>(h) + p.eps);
    T* dst = out + t * h;
    for (int64_t i = 0; i < h; ++i)
      dst[i] = from_float<T>(to_float(w[i]) * round_to<T>(to_float(src[i]) * r));
  }
  return Status::kOk;
}

// silu(g) = g * sigmoid(g), with exp of -|g| only (fast_math.h's exp_nonpositive: no
// overflow for large |g|, and a select that vectorises under -fno-trapping-math).
inline float silu(float g) {
  const float e = exp_nonpositive(g >= 0.f ? -g : g);
  return g * (g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

struct SiluAndMulParams {
  const void* x;  // [num_tokens, 2 * d] rows contiguous: gate then up
  void* out;      // [num_tokens, d] contiguous
  int64_t num_tokens;
  int64_t d;
};

template <typename T>
Status silu_and_mul(const SiluAndMulParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t d = p.d;
#pragma omp parallel for schedule(static) if (p.num_tokens * d >= kElementwiseParallelMin)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const T* gate = x + t * 2 * d;
    const T* up = gate + d;
    T* dst = out + t * d;
    for (int64_t i = 0; i < d; ++i) {
      const float g = to_float(gate[i]);
      const float silu_g = round_to<T>(silu(g));
      dst[i] = from_float<T>(silu_g * to_float(up[i]));
    }
  }
  return Status::kOk;
}

struct RotaryParams {
  void* query;               // [num_tokens, num_heads, head_dim], token stride query_stride
  void* key;                 // [num_tokens, num_kv_heads, head_dim], token stride key_stride
  const int64_t* positions;  // [num_tokens], each in [0, max_position)
  const float* cos_sin;      // [max_position, 2, rot_dim / 2]: cos then sin
  int64_t num_tokens;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t query_stride;
  int64_t key_stride;
  int64_t max_position;
};

namespace rotary_detail {

template <typename T>
inline void rotate_head(T* head, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float c = round_to<T>(cos[i]);
    const float s = round_to<T>(sin[i]);
    const float x1 = to_float(head[i]);
    const float x2 = to_float(head[i + half]);
    head[i] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    head[i + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

}  // namespace rotary_detail

// In place on query and key (neox style: the head's halves are the rotated pairs).
template <typename T>
Status rotary(const RotaryParams& p) {
  T* q = static_cast<T*>(p.query);
  T* k = static_cast<T*>(p.key);
  const int64_t half = p.head_dim / 2;
  const int64_t work = p.num_tokens * (p.num_heads + p.num_kv_heads) * p.head_dim;
#pragma omp parallel for schedule(static) if (work >= kElementwiseParallelMin)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const float* cos = p.cos_sin + p.positions[t] * 2 * half;
    const float* sin = cos + half;
    for (int64_t h = 0; h < p.num_heads; ++h)
      rotary_detail::rotate_head(q + t * p.query_stride + h * p.head_dim, cos, sin, half);
    for (int64_t h = 0; h < p.num_kv_heads; ++h)
      rotary_detail::rotate_head(k + t * p.key_stride + h * p.head_dim, cos, sin, half);
  }
  return Status::kOk;
}

}  // namespace drt::cpu
