// Launcher-layer helpers of the CUDA module: CUDA error checks that become Python
// RuntimeErrors, the device guard of a call, and the dispatch macros (FlashInfer's
// DISPATCH_*) that turn run-time dtype / head_dim / block_size into template arguments.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/launcher.h"

namespace drt::cuda_ops {

// Throws RuntimeError("<what> failed: <cudaErrorName>: <description>") unless `err` is
// cudaSuccess. Every CUDA call and every launch (through cudaGetLastError) goes through it.
inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  throw std::runtime_error("distserve_rt CUDA: " + what + " failed: " + cudaGetErrorName(err) +
                           ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

// Makes the stream's device current for the duration of a call (and restores the previous
// one), so that a launch on cuda:1's stream works whatever device the caller had current.
class StreamDeviceGuard {
 public:
  explicit StreamDeviceGuard(cudaStream_t stream) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    int device = previous_;
    // The legacy default stream (0) belongs to whatever device is current.
    if (stream != nullptr) check_cuda(cudaStreamGetDevice(stream, &device), "cudaStreamGetDevice");
    if (device != previous_) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
      switched_ = true;
    }
    device_ = device;
  }
  ~StreamDeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // best effort: destructors must not throw
  }
  StreamDeviceGuard(const StreamDeviceGuard&) = delete;
  StreamDeviceGuard& operator=(const StreamDeviceGuard&) = delete;
  int device() const { return device_; }

 private:
  int previous_ = 0;
  int device_ = 0;
  bool switched_ = false;
};

// 16-byte vector access needs every address of the access 16-byte aligned.
inline bool aligned16(std::uintptr_t address) { return address % 16 == 0; }
inline bool aligned16_elems(int64_t elems, int64_t elem_size) {
  return (elems * elem_size) % 16 == 0;
}

}  // namespace drt::cuda_ops

// Runs the body (a lambda returning cudaError_t) with `T` bound to the CUDA type of `dtype`.
#define DRT_CUDA_DISPATCH_DTYPE(dtype, T, ...)             \
  [&]() -> cudaError_t {                                   \
    switch (dtype) {                                       \
      case ::drt::DType::kFloat32: {                       \
        using T = float;                                   \
        return __VA_ARGS__();                              \
      }                                                    \
      case ::drt::DType::kFloat16: {                       \
        using T = __half;                                  \
        return __VA_ARGS__();                              \
      }                                                    \
      case ::drt::DType::kBFloat16: {                      \
        using T = __nv_bfloat16;                           \
        return __VA_ARGS__();                              \
      }                                                    \
    }                                                      \
    throw std::invalid_argument("unsupported dtype code"); \
  }()

// Head dims the attention kernels are instantiated for; the launchers check them first
// with a message that lists these.
#define DRT_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, ...)                                      \
  [&]() -> cudaError_t {                                                                    \
    switch (head_dim) {                                                                     \
      case 64: {                                                                            \
        constexpr int HEAD_DIM = 64;                                                        \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case 128: {                                                                           \
        constexpr int HEAD_DIM = 128;                                                       \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
    }                                                                                       \
    throw std::invalid_argument("head_dim " + std::to_string(head_dim) +                    \
                                " is not supported by the CUDA kernels; allowed: 64, 128"); \
  }()

#define DRT_DISPATCH_BLOCK_SIZE(block_size, BLOCK_SIZE, ...)                                  \
  [&]() -> cudaError_t {                                                                      \
    switch (block_size) {                                                                     \
      case 8: {                                                                               \
        constexpr int BLOCK_SIZE = 8;                                                         \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case 16: {                                                                              \
        constexpr int BLOCK_SIZE = 16;                                                        \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case 32: {                                                                              \
        constexpr int BLOCK_SIZE = 32;                                                        \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
    }                                                                                         \
    throw std::invalid_argument("block_size " + std::to_string(block_size) +                  \
                                " is not supported by the CUDA kernels; allowed: 8, 16, 32"); \
  }()
