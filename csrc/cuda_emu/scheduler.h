// Controls of the CUDA emulator that its Python module exposes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace drt_emu {

// The order warps run in between barriers: forward (0, 1, ...), reverse, or shuffled anew
// for every barrier phase from `seed`.
enum class WarpOrder { kForward, kReverse, kRandom };
void set_warp_order(WarpOrder order, uint64_t seed);

}  // namespace drt_emu
