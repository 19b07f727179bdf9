// Plain C++ entry points of the CUDA module (defined in the .cu files beside this, bound in
// module.cpp). Same names and argument structs as the CPU module's (distserve_rt/op_args.h;
// common.h for the shapes), plus a `stream` (cudaStream_t as an int): kernels are queued on
// it, nothing synchronises. Pointers are device addresses as ints; strides are in elements unless
// named *_bytes. Bad arguments raise std::invalid_argument (ValueError); CUDA failures raise
// std::runtime_error naming the call.
#pragma once

#include <cstdint>

#include "distserve_rt/op_args.h"

namespace drt::cuda_ops {

// cache_ops.cu
void write_kv(const WriteKVArgs& args, std::uintptr_t stream);

// block_mapping: int64 [num_pairs, 2] in device memory.
void copy_blocks(const CopyBlocksArgs& args, std::uintptr_t stream);

// The same copy through cudaMemcpyBatchAsync (copy engines instead of SMs); block_mapping
// is in HOST memory here (the driver takes host arrays of pointers), and its ids are
// checked (ValueError) since that costs no synchronisation. Needs a non-default stream.
void copy_blocks_memcpy_batch(const CopyBlocksArgs& args, std::uintptr_t stream);

// peer_access.cpp
bool can_access_peer(int64_t device, int64_t peer_device);
void enable_peer_access(int64_t device, int64_t peer_device);

// prefill_attention.cu
void prefill_attention(const PrefillAttentionArgs& args, std::uintptr_t stream);

// decode_attention.cu
int64_t decode_attention_workspace_bytes(const DecodeWorkspaceArgs& args);

void decode_attention(const DecodeAttentionArgs& args, std::uintptr_t stream);

}  // namespace drt::cuda_ops
