// Host stand-in for <cuda_runtime.h> in the CPU emulation build (csrc/cuda_emu/README.md):
// the qualifiers become plain C++, the built-in index variables are globals the scheduler
// sets before it resumes each emulated thread, and the runtime calls the launchers make
// succeed on the one emulated device. Only what the project's kernels and launchers use.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)

// ---- vector types (the alignment is the CUDA one: 16-byte vectors load as one access) ----
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Set by the emulator (runtime.cpp) for the running CTA and thread.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
inline constexpr int warpSize = 32;

// ---- device math: the same functions at fp32 (the fast intrinsics at full precision: the
// tolerances of the tests cover the difference) ----
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float x) {
  unsigned i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}

// ---- synchronisation and warp collectives: cooperative points of the emulated threads ----
namespace drt_emu {
void syncthreads(const char* file, int line);
void syncwarp(uint32_t mask, const char* file, int line);
uint32_t shfl(uint32_t mask, uint32_t value, int arg, int width, int mode, const char* file,
              int line);
enum ShflMode { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
template <typename T>
inline T shfl_as(uint32_t mask, T value, int arg, int width, int mode, const char* file, int line) {
  static_assert(sizeof(T) == 4, "the emulated shuffles move 32-bit values");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = shfl(mask, bits, arg, width, mode, file, line);
  std::memcpy(&value, &bits, 4);
  return value;
}
}  // namespace drt_emu

// A call site names the barrier, so threads at different __syncthreads are reported.
#define __syncthreads() ::drt_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::drt_emu::syncwarp(DRT_EMU_MASK(__VA_ARGS__), __FILE__, __LINE__)
// The optional mask of __syncwarp (the full warp when left out).
#define DRT_EMU_MASK(...) (0xffffffffu __VA_OPT__(*0 + (__VA_ARGS__)))
#define __shfl_sync(mask, v, lane, ...)                                                        \
  ::drt_emu::shfl_as(mask, v, lane, DRT_EMU_WIDTH(__VA_ARGS__), ::drt_emu::kShflIdx, __FILE__, \
                     __LINE__)
#define __shfl_up_sync(mask, v, delta, ...)                                                    \
  ::drt_emu::shfl_as(mask, v, delta, DRT_EMU_WIDTH(__VA_ARGS__), ::drt_emu::kShflUp, __FILE__, \
                     __LINE__)
#define __shfl_down_sync(mask, v, delta, ...)                                                    \
  ::drt_emu::shfl_as(mask, v, delta, DRT_EMU_WIDTH(__VA_ARGS__), ::drt_emu::kShflDown, __FILE__, \
                     __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...)                                          \
  ::drt_emu::shfl_as(mask, v, lane_mask, DRT_EMU_WIDTH(__VA_ARGS__), ::drt_emu::kShflXor, \
                     __FILE__, __LINE__)
// The optional `width` argument of the shuffles (32 when left out).
#define DRT_EMU_WIDTH(...) (32 __VA_OPT__(*0 + (__VA_ARGS__)))

// ---- runtime API: one device, every call succeeds (host memory is the device's) ----
using cudaStream_t = struct CUstream_st*;
using cudaEvent_t = struct CUevent_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorNotSupported = 801 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t err) {
  return err == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulation";
}
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "not supported by the CPU emulation";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaStreamGetDevice(cudaStream_t, int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
// What the emulated device reports to launchers that size grids from occupancy (the decode
// split planner): an H200's 132 SMs, and 6 resident CTAs of any kernel per SM (the decode
// split kernel's shared-memory limit there). Emulation runs CTAs one at a time, so these
// only choose the grid the tests exercise, as the real device's numbers would.
constexpr int kEmuMultiProcessorCount = 132;
constexpr int kEmuResidentCtasPerSm = 6;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidValue;
  *value = kEmuMultiProcessorCount;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, F*, int, size_t) {
  *num_blocks = kEmuResidentCtasPerSm;
  return cudaSuccess;
}
namespace drt_emu {
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  return drt_emu::set_max_dynamic_shared(kernel, value);
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// cudaMemcpyBatchAsync (CUDA 13) is declared so cache_ops.cu compiles unchanged; the
// emulated module does not bind copy_blocks_memcpy_batch (copy engines are not emulated).
enum cudaMemcpySrcAccessOrder { cudaMemcpySrcAccessOrderStream = 1 };
enum cudaMemcpyFlags { cudaMemcpyFlagPreferOverlapWithCompute = 1 };
struct cudaMemcpyAttributes {
  cudaMemcpySrcAccessOrder srcAccessOrder;
  unsigned flags;
};
inline cudaError_t cudaMemcpyBatchAsync(void* const*, const void* const*, const size_t*, size_t,
                                        cudaMemcpyAttributes*, size_t*, size_t, cudaStream_t) {
  return cudaErrorNotSupported;
}

#include "cuda_emu_launch.h"
