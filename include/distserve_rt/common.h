// Shared vocabulary of every native layer: status codes, dtype codes, shape conventions.
// Header-only, no torch, no pybind11 (FlashInfer's first layer).
//
// Shapes used everywhere (elements, not bytes; "stride" = elements between rows):
//   query            [num_tokens, num_heads, head_dim]
//   key, value       [num_tokens, num_kv_heads, head_dim]
//   KV pool          [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
//   kv_cache (layer) [num_blocks, 2, num_kv_heads, block_size, head_dim]   = pool[:, layer]
//                    dims 1.. contiguous; dim 0 has stride kv_block_stride
//   block_table      [batch, max_blocks_per_seq] int32
//   slot_mapping     [num_tokens] int64, slot = block * block_size + offset, < 0 = padding
//   cu_seqlens       [batch + 1] int32, seq_lens [batch] int32
#pragma once

#include <cstddef>
#include <cstdint>

namespace drt {

// Status codes cross the C boundary instead of exceptions (llama.cpp's rule); the launcher
// layer in csrc/ turns them into Python exceptions with a message.
enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,
  kOutOfMemory = 2,
  kCudaError = 3,
  kNotSupported = 4,
};

// Must match distserve_rt/_native.py (DTYPE_CODES).
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

inline std::size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline const char* status_name(Status status) {
  switch (status) {
    case Status::kOk:
      return "ok";
    case Status::kInvalidArgument:
      return "invalid argument";
    case Status::kOutOfMemory:
      return "out of memory";
    case Status::kCudaError:
      return "CUDA error";
    case Status::kNotSupported:
      return "not supported";
  }
  return "unknown status";
}

}  // namespace drt
