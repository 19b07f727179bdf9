// The CPU kernels' thread count, one value for the whole process.
//
// omp_set_num_threads only sets the calling OS thread's default: an engine that sets the
// count in its main thread and runs steps from a worker thread would silently use every
// core. So the count lives here and every launcher applies it on the thread that calls it.
// torch's CPU wheel loads the same libgomp, so torch.set_num_threads changes the calling
// thread's OpenMP default too; once set_num_threads was called here, ours wins for our ops.
#pragma once

#include <omp.h>

#include <atomic>

namespace drt::cpu {

// 0: not set, use OpenMP's default of the calling thread (OMP_NUM_THREADS or all cores).
inline std::atomic<int>& configured_num_threads() {
  static std::atomic<int> num_threads{0};
  return num_threads;
}

inline void apply_num_threads() {
  const int n = configured_num_threads().load(std::memory_order_relaxed);
  if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
}

inline int effective_num_threads() {
  apply_num_threads();
  return omp_get_max_threads();
}

}  // namespace drt::cpu
