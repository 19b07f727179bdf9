// Asynchronous 16-byte global -> shared copies (cp.async, sm_80+): tiles stream into shared
// memory while the previous tile is computed on (FlashAttention-2's pipeline).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace drt::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Copies 16 bytes from global `src` to shared `dst` when `pred`, else writes 16 zero bytes
// (the zero-fill form reads nothing, so `src` only has to be a valid address, never
// dereferenced). .cg bypasses L1: each tile is used once per CTA.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
  const uint32_t src_bytes = pred ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `kPending` committed groups are still in flight (this thread's copies).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace drt::cuda
