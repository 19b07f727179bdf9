// Small kernels that break the CUDA rules on purpose, to show that the emulator catches
// each kind of bug the project's kernels could have (tests/kernels/test_cuda_emulated.py).
// Compiled through the same generator as the real launchers, so <<<>>> and __shared__ go
// the same way.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_emu/harness.h"
#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/mma.cuh"

namespace drt_emu::harness {
namespace {

// Thread 5 leaves before the barrier the others wait at.
__global__ void missing_arrival_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// The two warps reach different __syncthreads call sites.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 3 leaves before a full-warp shuffle.
__global__ void missing_lane_kernel(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Lane 7 leaves before the warp barrier.
__global__ void syncwarp_missing_lane_kernel(float* out) {
  if (threadIdx.x == 7) return;
  __syncwarp();
  out[threadIdx.x] = 1.f;
}

// Each thread copies 16 bytes into shared memory with cp.async and then reads its
// neighbour's: correct only with the wait_group before the barrier.
__global__ void cp_async_kernel(const float* src, float* out, bool wait) {
  __shared__ float4 tile[32];
  const int t = threadIdx.x;
  drt::cuda::cp_async_16(&tile[t], src + 4 * t, true);
  drt::cuda::cp_async_commit();
  if (wait) drt::cuda::cp_async_wait<0>();
  __syncthreads();
  const float4 v = tile[(t + 1) % 32];
  out[4 * t] = v.x;
  out[4 * t + 1] = v.y;
  out[4 * t + 2] = v.z;
  out[4 * t + 3] = v.w;
}

// Warp 1 reads what warp 0 wrote to shared memory with no barrier between: a race whose
// outcome depends on which warp runs first.
__global__ void unsynchronised_read_kernel(float* out) {
  __shared__ float value;
  if (threadIdx.x == 0) value = 1.f;
  if (threadIdx.x == 32) *out = value;
}

// Reads 16-byte words at byte offset `offset` of `src`: a fault on a GPU unless it is a
// multiple of 16.
__global__ void vector_read_kernel(const char* src, int offset, uint4* out) {
  out[threadIdx.x] = reinterpret_cast<const uint4*>(src + offset)[threadIdx.x];
}

// D = A B (16x16 by 16x16, fp32 out) on one warp, through the canonical fragment loads:
// A row major with ldmatrix.x4, B both as [n][k] (ldmatrix.x4) and as [k][n]
// (ldmatrix.x4.trans), each feeding two mma.m16n8k16; d_nk and d_kn get the two results.
template <typename T>
__global__ void mma_kernel(const uint4* a, const uint4* b_nk, const uint4* b_kn, float* d_nk,
                           float* d_kn) {
  __shared__ uint4 sa[16][2];  // 16 rows of 16 b16
  __shared__ uint4 sb_nk[16][2];
  __shared__ uint4 sb_kn[16][2];
  const int l = threadIdx.x;
  sa[l / 2][l % 2] = a[l];
  sb_nk[l / 2][l % 2] = b_nk[l];
  sb_kn[l / 2][l % 2] = b_kn[l];
  __syncthreads();
  uint32_t af[4], bn[4], bk[4];
  drt::cuda::ldmatrix_x4(af, &sa[l % 16][l / 16]);
  drt::cuda::ldmatrix_x4(bn, &sb_nk[(l / 16) * 8 + l % 8][(l / 8) % 2]);
  drt::cuda::ldmatrix_x4_trans(bk, &sb_kn[((l / 8) % 2) * 8 + l % 8][l / 16]);
  const int g = l / 4, q = l % 4;
  for (int t = 0; t < 2; ++t) {
    float dn[4] = {}, dk[4] = {};
    drt::cuda::mma_16816<T>(dn, af, bn[2 * t], bn[2 * t + 1]);
    drt::cuda::mma_16816<T>(dk, af, bk[2 * t], bk[2 * t + 1]);
    for (int i = 0; i < 4; ++i) {
      const int idx = (g + 8 * (i / 2)) * 16 + t * 8 + 2 * q + i % 2;
      d_nk[idx] = dn[i];
      d_kn[idx] = dk[i];
    }
  }
}

// Declared for at most 32 threads per block.
__global__ void __launch_bounds__(32) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

// out[i] = src[i] for i < n, with a grid-stride loop over one CTA of 64 threads.
__global__ void copy_kernel(const float* src, float* out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = src[i];
}

}  // namespace

void missing_arrival(int* out) { missing_arrival_kernel<<<1, 64>>>(out); }
void divergent_barrier(int* out) { divergent_barrier_kernel<<<1, 64>>>(out); }
void missing_lane(float* out) { missing_lane_kernel<<<1, 32>>>(out); }
void syncwarp_missing_lane(float* out) { syncwarp_missing_lane_kernel<<<1, 32>>>(out); }
void cp_async_then_read(const float* src, float* out, bool wait) {
  cp_async_kernel<<<1, 32>>>(src, out, wait);
}
void unsynchronised_read(float* out) { unsynchronised_read_kernel<<<1, 64>>>(out); }
void vector_read(const char* src, int offset, uint4* out) {
  vector_read_kernel<<<1, 32>>>(src, offset, out);
}
void bounded(int* out, int threads) { bounded_kernel<<<1, threads>>>(out); }
void mma(bool bf16, const void* a, const void* b_nk, const void* b_kn, float* d_nk, float* d_kn) {
  auto words = [](const void* p) { return static_cast<const uint4*>(p); };
  if (bf16) {
    mma_kernel<__nv_bfloat16><<<1, 32>>>(words(a), words(b_nk), words(b_kn), d_nk, d_kn);
  } else {
    mma_kernel<__half><<<1, 32>>>(words(a), words(b_nk), words(b_kn), d_nk, d_kn);
  }
}
void copy(const float* src, float* out, int64_t n) { copy_kernel<<<1, 64>>>(src, out, n); }

}  // namespace drt_emu::harness
