// The arguments of the KV-cache and attention ops as their launchers take them: one struct
// per op, written once here and shared by the CPU launchers (csrc/cpu/), the CUDA launchers
// (csrc/cuda/*.cu, declared in csrc/cuda/ops.h), the shared argument checks
// (csrc/common/shape_checks.h) and the one keyword-only binding of each op that both modules
// use (csrc/common/op_bindings.h). Every layer reads a field by its name, so two ints of the
// same type cannot be swapped silently between layers: before, each op's 10-25 ints were
// listed positionally four to six times and a swap compiled.
//
// These are the host-side ABI (pointers as integers, strides in elements unless named
// *_bytes, `dtype` a drt::DType code); the kernels take their own typed parameter structs
// (cpu::DecodeAttentionParams, cuda::DecodeParams, ...) built from these after the checks.
// Shapes follow common.h. Plain C++17, no pybind11: .cu files include it.
#pragma once

#include <cstdint>

namespace drt {

// write_kv: key/value [num_tokens, num_kv_heads, head_dim] into one layer's
// kv_cache [num_blocks, 2, num_kv_heads, block_size, head_dim] at slot_mapping.
struct WriteKVArgs {
  std::uintptr_t key = 0;           // [num_tokens, num_kv_heads, head_dim]
  std::uintptr_t value = 0;         // [num_tokens, num_kv_heads, head_dim]
  std::uintptr_t kv_cache = 0;      // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  std::uintptr_t slot_mapping = 0;  // [num_tokens] int64, < 0 = padding
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t key_token_stride = 0;    // elements between tokens of key
  int64_t value_token_stride = 0;  // elements between tokens of value
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t kv_block_stride = 0;  // elements between blocks of kv_cache
  int64_t dtype = 0;            // DType code of key, value and kv_cache
};

// copy_blocks (and CUDA's copy_blocks_memcpy_batch): dst block d = src block s for each row
// (s, d) of block_mapping. Sizes in bytes: the pools may hold any dtype.
struct CopyBlocksArgs {
  std::uintptr_t src = 0;            // [src_num_blocks, ...] pool
  std::uintptr_t dst = 0;            // [dst_num_blocks, ...] pool
  std::uintptr_t block_mapping = 0;  // [num_pairs, 2] int64 (src block, dst block)
  int64_t num_pairs = 0;
  int64_t src_num_blocks = 0;
  int64_t dst_num_blocks = 0;
  int64_t src_block_stride_bytes = 0;
  int64_t dst_block_stride_bytes = 0;
  int64_t block_bytes = 0;  // bytes copied per pair
};

// prefill_attention: causal varlen attention of the new tokens; the paged part (kv_cache,
// block_table, prefix_lens, slot_mapping and the sizes after them) is optional: a pointer
// of 0 means "not given".
struct PrefillAttentionArgs {
  std::uintptr_t query = 0;       // [num_tokens, num_heads, head_dim]
  std::uintptr_t key = 0;         // [num_tokens, num_kv_heads, head_dim]
  std::uintptr_t value = 0;       // [num_tokens, num_kv_heads, head_dim]
  std::uintptr_t out = 0;         // [num_tokens, num_heads, head_dim]
  std::uintptr_t cu_seqlens = 0;  // [batch + 1] int32
  int64_t batch = 0;
  int64_t num_tokens = 0;
  int64_t max_seqlen_q = 0;  // upper bound of any sequence's new tokens
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t query_token_stride = 0;
  int64_t key_token_stride = 0;
  int64_t value_token_stride = 0;
  int64_t out_token_stride = 0;
  double softmax_scale = 0;
  std::uintptr_t kv_cache = 0;      // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  std::uintptr_t block_table = 0;   // [batch, max_blocks_per_seq] int32, with prefix_lens
  std::uintptr_t prefix_lens = 0;   // [batch] int32: cached tokens before the new ones
  std::uintptr_t slot_mapping = 0;  // [num_tokens] int64: where the new K/V are written
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t kv_block_stride = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t dtype = 0;  // DType code of query, key, value, out and kv_cache
};

// decode_attention: one query token per sequence against its seq_lens[i] cached tokens.
struct DecodeAttentionArgs {
  std::uintptr_t query = 0;        // [batch, num_heads, head_dim], batch stride query_stride
  std::uintptr_t out = 0;          // [batch, num_heads, head_dim], batch stride out_stride
  std::uintptr_t kv_cache = 0;     // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  std::uintptr_t block_table = 0;  // [batch, max_blocks_per_seq] int32
  std::uintptr_t seq_lens = 0;     // [batch] int32
  std::uintptr_t workspace = 0;    // [workspace_bytes] scratch for split partials
  int64_t workspace_bytes = 0;     // at least decode_attention_workspace_bytes(...)
  int64_t batch = 0;
  int64_t max_seq_len = 0;  // upper bound of seq_lens (sizes the splits)
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t query_stride = 0;
  int64_t out_stride = 0;
  double softmax_scale = 0;
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t kv_block_stride = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t dtype = 0;  // DType code of query, out and kv_cache
};

// decode_attention_workspace_bytes: the sizes the split plan depends on.
struct DecodeWorkspaceArgs {
  int64_t batch = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t max_seq_len = 0;
};

}  // namespace drt
