// Device scalar types and 16-byte vector access shared by the CUDA kernels.
// Every kernel stores T (float, __half, __nv_bfloat16) and computes in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace drt::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte access: the widest load/store a thread can issue.
template <typename T>
inline constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// Converts the 16 bytes in `raw` (kVecElems<T> values of T) to fp32.
template <typename T>
__device__ __forceinline__ void vec_to_float(const uint4& raw, float (&out)[kVecElems<T>]) {
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) out[i] = to_float(elems[i]);
}

// Packs kVecElems<T> fp32 values into 16 bytes of T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 float_to_vec(const float (&in)[kVecElems<T>]) {
  uint4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) elems[i] = from_float<T>(in[i]);
  return raw;
}

// A 16-byte vector whose every element is NaN: what a tile row gets when its block id is
// out of range, so that the bad id shows up as NaN in the output instead of a silent
// wrong answer (the kernels cannot raise without a host synchronisation).
template <typename T>
__device__ __forceinline__ uint4 nan_vec() {
  float nan[kVecElems<T>];
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) nan[i] = __int_as_float(0x7fc00000);
  return float_to_vec<T>(nan);
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

}  // namespace drt::cuda
