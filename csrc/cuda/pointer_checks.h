// Host-side checks of where a pointer lives, for the ops whose buffers may come from other
// processes (CUDA IPC) or other GPUs: a kernel that touches unmappable memory kills the
// whole CUDA context, so these raise first. Defined in peer_access.cpp.
#pragma once

#include <cstdint>

namespace drt::cuda_ops {

// Raises ValueError unless `address` is memory a kernel on `device` can read and write:
// its own device memory, managed or pinned host memory, or another GPU's memory over
// peer-to-peer (enabled here when the hardware allows it; RuntimeError when it does not).
void check_kernel_accessible(std::uintptr_t address, const char* name, int device);

// Raises ValueError unless `address` is host memory (pageable or pinned).
void check_host_memory(std::uintptr_t address, const char* name);

}  // namespace drt::cuda_ops
