// Test-only kernels of the CUDA emulator (harness_kernels.cu): each breaks one rule.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace drt_emu::harness {

void missing_arrival(int* out);                                    // [64]
void divergent_barrier(int* out);                                  // [64]
void missing_lane(float* out);                                     // [32]
void syncwarp_missing_lane(float* out);                            // [32]
void cp_async_then_read(const float* src, float* out, bool wait);  // [128] each
void unsynchronised_read(float* out);                              // [1]
void vector_read(const char* src, int offset, uint4* out);         // src [offset + 512], out [32]
void bounded(int* out, int threads);                               // [threads]
// a, b_nk (= B^T), b_kn (= B): [16, 16] fp16/bf16 row major; d_nk, d_kn: [16, 16] fp32.
void mma(bool bf16, const void* a, const void* b_nk, const void* b_kn, float* d_nk, float* d_kn);
void copy(const float* src, float* out, int64_t n);  // [n] each

}  // namespace drt_emu::harness
