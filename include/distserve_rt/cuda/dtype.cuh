// Device scalar types and 16-byte vector access shared by the CUDA kernels.
// Every kernel stores T (float, __half, __nv_bfloat16) and computes in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

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

// The two 16-bit values packed in a 32-bit word (low half first, as in memory) to fp32.
__device__ __forceinline__ float2 word_to_float2(uint32_t word, __nv_bfloat16 /*tag*/) {
  // A bf16 is the top half of an fp32: shift and mask are the exact conversion.
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
}
__device__ __forceinline__ float2 word_to_float2(uint32_t word, __half /*tag*/) {
  __half2 pair;
  static_assert(sizeof(pair) == sizeof(word));
  memcpy(&pair, &word, sizeof(word));
  return __half22float2(pair);
}

// Converts the 16 bytes in `raw` (kVecElems<T> values of T) to fp32. `raw` is taken by value
// and converted from its 32-bit words: reading the elements through a `const T*` into
// shared memory made nvcc split the 16-byte load into 8 LDS.U16 (bf16, sm_90a).
template <typename T>
__device__ __forceinline__ void vec_to_float(const uint4 raw, float (&out)[kVecElems<T>]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      out[i] = __uint_as_float(words[i]);
    } else {
      const float2 pair = word_to_float2(words[i], T{});
      out[2 * i] = pair.x;
      out[2 * i + 1] = pair.y;
    }
  }
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
