// The CUDA side of the KV transfer engine (cuda_ipc backend): the block-slice kernel's
// launcher (transfer_kernels.cu) and the engine's registration (transfer_ipc.cpp).
#pragma once

#include <cuda_runtime.h>

#include "distserve_rt/transfer/block_slice.h"

namespace pybind11 {
class module_;
}

namespace drt::cuda_ops {

// Queues the slice copy of every pair on `stream`; p.block_mapping is device memory.
cudaError_t launch_block_slices(const transfer::SliceCopyParams& p, cudaStream_t stream);

// Binds IpcTransferEngine and check_ipc_transfer_args into the CUDA module.
void register_transfer(pybind11::module_& m);

}  // namespace drt::cuda_ops
