// Host stand-in for <cuda_fp16.h> (CPU emulation build): __half as its 16 bits, converted
// with round-to-nearest-even through the compiler's _Float16 (IEEE binary16, as on the GPU).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.__x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.__x, &f, 2);
  return h;
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}
inline __half2 __float2half2_rn(float x) { return {__float2half_rn(x), __float2half_rn(x)}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
