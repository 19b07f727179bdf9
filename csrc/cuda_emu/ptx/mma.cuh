// Host variant of include/distserve_rt/cuda/mma.cuh for the CPU emulation (the build's
// generator substitutes it): ldmatrix and mma.sync become warp collectives of the emulator
// (csrc/cuda_emu/warp_ops.cpp), computed from the PTX ISA's fragment layouts once all 32
// lanes have arrived. pack2 is the CUDA header's, unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "distserve_rt/cuda/cp_async.cuh"

namespace drt::cuda {

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::drt_emu::ldmatrix(r, 4, false, smem_row, file, line);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::drt_emu::ldmatrix(r, 4, true, smem_row, file, line);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma_16816 takes __half or __nv_bfloat16");
  const auto type =
      std::is_same_v<T, __half> ? ::drt_emu::MmaType::kF16 : ::drt_emu::MmaType::kBF16;
  ::drt_emu::mma_m16n8k16(d, a, b0, b1, type, file, line);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace drt::cuda
