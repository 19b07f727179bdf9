// Vectorisable float math shared by the CPU kernels (decode attention's softmax, the
// layer ops' SiLU): libm's expf stays scalar without -ffast-math, which we avoid (GCC 12
// links crtfastmath into shared objects and would set flush-to-zero for the process).
#pragma once

#include <cstdint>
#include <cstring>

namespace drt::cpu {

// exp(x) for x <= 0 as a branch-free polynomial (Cephes expf, ~1 ulp) that vectorises in
// `omp simd` loops, unlike libm's expf. Clamping maps -inf (an empty running max) to ~1e-38.
// Written for GCC's vectoriser without -fno-trapping-math: a ternary, not std::max, and
// rounding by adding 1.5 * 2^23, not std::floor (neither of which it vectorises).
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace drt::cpu
