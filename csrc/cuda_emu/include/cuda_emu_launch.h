// What the generated kernel sources call in place of CUDA syntax (csrc/cuda_emu/generate.py
// rewrites `k<<<grid, block, smem, stream>>>(args)` into drt_emu::launch and `__shared__`
// declarations into drt_emu::shared_var / dynamic_shared), and the PTX the two host-variant
// headers (csrc/cuda_emu/ptx/) stand in for. Implemented in csrc/cuda_emu/*.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

namespace drt_emu {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem_bytes;
  LaunchConfig(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr)
      : grid(g), block(b), smem_bytes(smem) {}
};

// Runs body(ctx) as every thread of every CTA of the grid; throws std::runtime_error naming
// the kernel, CTA and thread on a barrier, collective or memory error.
void run_grid(const char* kernel_name, const void* kernel, const LaunchConfig& cfg,
              void (*body)(void*), void* ctx);

template <typename... P, typename... A>
void launch(const char* kernel_name, const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  // By value, like a launch: each emulated thread gets the same parameter block.
  std::tuple<std::decay_t<P>...> bound(std::forward<A>(args)...);
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...>* args;
  } call{kernel, &bound};
  run_grid(
      kernel_name, reinterpret_cast<const void*>(kernel), cfg,
      [](void* c) {
        auto* call = static_cast<Call*>(c);
        std::apply(call->kernel, *call->args);
      },
      &call);
}

// First statement of a kernel with __launch_bounds__(max_threads): a larger block fails.
void check_launch_bounds(unsigned max_threads, const char* file, int line);

// `__shared__ T name;` of one call site: one object per CTA, in its own buffer that ends at
// a guard page and is filled with 0xFF (NaN) when each CTA starts.
void* shared_var(const char* file, int line, size_t bytes, size_t align);
template <typename T>
T& shared_var(const char* file, int line) {
  return *static_cast<T*>(shared_var(file, line, sizeof(T), alignof(T)));
}
// `extern __shared__ T name[];`: the launch's dynamic shared memory (same guard and fill).
void* dynamic_shared();
// Offset of a shared address in the emulated shared window (raises for other addresses).
size_t shared_offset(const void* ptr, const char* file, int line);

// PTX of the host-variant headers (csrc/cuda_emu/ptx/); file/line name the caller.
void cp_async(void* dst, const void* src, int src_bytes, int cp_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int pending, const char* file, int line);
void ldmatrix(uint32_t* regs, int num, bool trans, const void* row, const char* file, int line);
enum class MmaType { kF16, kBF16 };
void mma_m16n8k16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, MmaType type,
                  const char* file, int line);

}  // namespace drt_emu

#define __cvta_generic_to_shared(ptr) ::drt_emu::shared_offset(ptr, __FILE__, __LINE__)
