// Approximate fp32 exp2 and reciprocal for the attention softmax, where the result feeds
// sums that are rounded to fp16/bf16 (or compared at 1e-5 for fp32): the SFU's 2-ulp
// `ex2.approx` / `rcp.approx` are exact enough, and skip what the IEEE versions add
// (exp2f: a denormal-range check and two fix-up multiplies per call; 1.f / x: Newton steps
// and a slow-path subroutine call). A host compiler (the CPU emulation of the kernels) gets
// the IEEE functions.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace drt::cuda {

// 2^x; -inf -> 0, results below 2^-126 flush to 0 (softmax weights that small do not count).
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// 1 / x for the softmax normaliser (x >= 1: the row's max term contributes exp2(0) = 1).
__device__ __forceinline__ float fast_rcp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

}  // namespace drt::cuda
