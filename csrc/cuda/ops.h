// Plain C++ entry points of the CUDA module (defined in the .cu files beside this, bound in
// module.cpp). Same names and arguments as the CPU module's (see common.h for the shapes),
// plus a trailing `stream` (cudaStream_t as an int): kernels are queued on it, nothing
// synchronises. Pointers are device addresses as ints; strides are in elements unless
// named *_bytes. Bad arguments raise std::invalid_argument (ValueError); CUDA failures raise
// std::runtime_error naming the call.
#pragma once

#include <cstdint>

namespace drt::cuda_ops {

// cache_ops.cu
void write_kv(std::uintptr_t key, std::uintptr_t value, std::uintptr_t kv_cache,
              std::uintptr_t slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
              int64_t head_dim, int64_t key_token_stride, int64_t value_token_stride,
              int64_t num_blocks, int64_t block_size, int64_t kv_block_stride, int64_t dtype,
              std::uintptr_t stream);

// block_mapping: int64 [num_pairs, 2] in device memory.
void copy_blocks(std::uintptr_t src, std::uintptr_t dst, std::uintptr_t block_mapping,
                 int64_t num_pairs, int64_t src_num_blocks, int64_t dst_num_blocks,
                 int64_t src_block_stride_bytes, int64_t dst_block_stride_bytes,
                 int64_t block_bytes, std::uintptr_t stream);

// The same copy through cudaMemcpyBatchAsync (copy engines instead of SMs); block_mapping
// is in HOST memory here (the driver takes host arrays of pointers), and its ids are
// checked (ValueError) since that costs no synchronisation. Needs a non-default stream.
void copy_blocks_memcpy_batch(std::uintptr_t src, std::uintptr_t dst, std::uintptr_t block_mapping,
                              int64_t num_pairs, int64_t src_num_blocks, int64_t dst_num_blocks,
                              int64_t src_block_stride_bytes, int64_t dst_block_stride_bytes,
                              int64_t block_bytes, std::uintptr_t stream);

// peer_access.cpp
bool can_access_peer(int64_t device, int64_t peer_device);
void enable_peer_access(int64_t device, int64_t peer_device);

// prefill_attention.cu
void prefill_attention(std::uintptr_t query, std::uintptr_t key, std::uintptr_t value,
                       std::uintptr_t out, std::uintptr_t cu_seqlens, int64_t batch,
                       int64_t num_tokens, int64_t max_seqlen_q, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t query_token_stride,
                       int64_t key_token_stride, int64_t value_token_stride,
                       int64_t out_token_stride, double softmax_scale, std::uintptr_t kv_cache,
                       std::uintptr_t block_table, std::uintptr_t prefix_lens,
                       std::uintptr_t slot_mapping, int64_t num_blocks, int64_t block_size,
                       int64_t kv_block_stride, int64_t max_blocks_per_seq, int64_t dtype,
                       std::uintptr_t stream);

// decode_attention.cu
int64_t decode_attention_workspace_bytes(int64_t batch, int64_t num_heads, int64_t head_dim,
                                         int64_t max_seq_len, std::uintptr_t stream);

void decode_attention(std::uintptr_t query, std::uintptr_t out, std::uintptr_t kv_cache,
                      std::uintptr_t block_table, std::uintptr_t seq_lens, std::uintptr_t workspace,
                      int64_t workspace_bytes, int64_t batch, int64_t max_seq_len,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t query_stride, int64_t out_stride, double softmax_scale,
                      int64_t num_blocks, int64_t block_size, int64_t kv_block_stride,
                      int64_t max_blocks_per_seq, int64_t dtype, std::uintptr_t stream);

}  // namespace drt::cuda_ops
