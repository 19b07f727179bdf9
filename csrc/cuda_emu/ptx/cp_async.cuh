// Host variant of include/distserve_rt/cuda/cp_async.cuh for the CPU emulation (the build's
// generator substitutes it): the same functions, the PTX done by the emulator. A copy
// writes 0xFF (NaN) into its destination at issue and lands at the cp.async.wait_group
// that retires its group, so a read before the wait (or before the barrier after it) sees
// NaN instead of passing by luck.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace drt::cuda {

inline uint32_t smem_addr(const void* ptr, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return static_cast<uint32_t>(::drt_emu::shared_offset(ptr, file, line));
}

inline void cp_async_16(void* dst, const void* src, bool pred, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::drt_emu::cp_async(dst, src, pred ? 16 : 0, 16, file, line);
}

inline void cp_async_commit() { ::drt_emu::cp_async_commit(); }

template <int kPending>
inline void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::drt_emu::cp_async_wait(kPending, file, line);
}

}  // namespace drt::cuda
