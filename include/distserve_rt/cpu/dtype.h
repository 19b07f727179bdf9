// CPU scalar types: bf16 and fp16 stored as 16-bit patterns, computed in fp32.
#pragma once

#include <cstdint>
#include <cstring>

#include "distserve_rt/common.h"

namespace drt::cpu {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float to_float(fp16 x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof(h));
  return static_cast<float>(h);
}

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

// Round to nearest even, NaN kept quiet (same as torch's float -> bfloat16).
template <>
inline bf16 from_float<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <>
inline fp16 from_float<fp16>(float x) {
  _Float16 h = static_cast<_Float16>(x);
  fp16 out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
}

}  // namespace drt::cpu

// Runs the body with `scalar_t` bound to the CPU type of `dtype` (FlashInfer's DISPATCH_*).
#define DRT_CPU_DISPATCH_DTYPE(dtype, scalar_t, ...) \
  [&]() -> ::drt::Status {                           \
    switch (dtype) {                                 \
      case ::drt::DType::kFloat32: {                 \
        using scalar_t = float;                      \
        return __VA_ARGS__();                        \
      }                                              \
      case ::drt::DType::kFloat16: {                 \
        using scalar_t = ::drt::cpu::fp16;           \
        return __VA_ARGS__();                        \
      }                                              \
      case ::drt::DType::kBFloat16: {                \
        using scalar_t = ::drt::cpu::bf16;           \
        return __VA_ARGS__();                        \
      }                                              \
    }                                                \
    return ::drt::Status::kNotSupported;             \
  }()
