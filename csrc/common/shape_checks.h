// Scalar argument checks shared by the CPU launchers (csrc/cpu/) and the CUDA launchers
// (csrc/cuda/): one function per op holding the rules both backends enforce, with one wording.
// Each launcher calls it first, then checks only its own limits (CUDA: supported head_dim and
// block_size, alignment, grid limits, pointer locations; CPU: its max head_dim and block_size,
// the data-dependent ids). Plain C++17 without pybind11: it is included from .cu files too.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/launcher.h"
#include "distserve_rt/op_args.h"

namespace drt {

// Largest value the kernels may keep in an int (sizes, block ids, token positions).
constexpr int64_t kMaxInt32 = INT32_MAX;

// Sizes and strides (in elements) of write_kv: key/value [num_tokens, num_kv_heads, head_dim]
// into kv_cache [num_blocks, 2, num_kv_heads, block_size, head_dim].
inline void check_write_kv_shapes(const WriteKVArgs& a) {
  check_arg(a.num_tokens >= 0, "num_tokens must be >= 0, got ", a.num_tokens);
  check_arg(a.num_kv_heads >= 1, "num_kv_heads must be >= 1, got ", a.num_kv_heads);
  check_arg(a.head_dim >= 1, "head_dim must be >= 1, got ", a.head_dim);
  check_arg(a.num_blocks >= 0, "num_blocks must be >= 0, got ", a.num_blocks);
  check_arg(a.block_size >= 1, "block_size must be >= 1, got ", a.block_size);
  const int64_t token_numel = a.num_kv_heads * a.head_dim;
  check_arg(a.key_token_stride >= token_numel, "key_token_stride (", a.key_token_stride,
            ") must be >= num_kv_heads * head_dim (", token_numel, ") so tokens do not overlap");
  check_arg(a.value_token_stride >= token_numel, "value_token_stride (", a.value_token_stride,
            ") must be >= num_kv_heads * head_dim (", token_numel, ") so tokens do not overlap");
  const int64_t block_numel = 2 * token_numel * a.block_size;
  check_arg(a.kv_block_stride >= block_numel, "kv_block_stride (", a.kv_block_stride,
            ") must be >= 2 * num_kv_heads * block_size * head_dim (", block_numel,
            ") so blocks do not overlap");
}

// Sizes and strides (in bytes) of copy_blocks and copy_blocks_memcpy_batch.
inline void check_copy_blocks_shapes(const CopyBlocksArgs& a) {
  check_arg(a.num_pairs >= 0, "num_pairs must be >= 0, got ", a.num_pairs);
  check_arg(a.src_num_blocks >= 0, "src_num_blocks must be >= 0, got ", a.src_num_blocks);
  check_arg(a.dst_num_blocks >= 0, "dst_num_blocks must be >= 0, got ", a.dst_num_blocks);
  check_arg(a.block_bytes >= 1, "block_bytes must be >= 1, got ", a.block_bytes);
  check_arg(a.src_block_stride_bytes >= a.block_bytes, "src_block_stride_bytes (",
            a.src_block_stride_bytes, ") must be >= block_bytes (", a.block_bytes,
            ") so blocks of src do not overlap");
  check_arg(a.dst_block_stride_bytes >= a.block_bytes, "dst_block_stride_bytes (",
            a.dst_block_stride_bytes, ") must be >= block_bytes (", a.block_bytes,
            ") so blocks of dst do not overlap");
}

// Checked as the float both backends' kernels use: a double that rounds to 0 or inf is rejected.
inline void check_softmax_scale(double softmax_scale) {
  const float scale = static_cast<float>(softmax_scale);
  check_arg(std::isfinite(scale) && scale > 0.0f,
            "softmax_scale must be a positive finite number, got ", softmax_scale);
}

// num_heads query heads share num_kv_heads K/V heads (GQA): a whole number per K/V head.
inline void check_gqa_heads(int64_t num_heads, int64_t num_kv_heads) {
  check_arg(num_kv_heads >= 1 && num_heads >= 1 && num_heads % num_kv_heads == 0, "num_heads (",
            num_heads, ") must be a positive multiple of num_kv_heads (", num_kv_heads, ")");
  check_arg(num_heads <= kMaxInt32, "num_heads must be in [1, 2^31), got ", num_heads);
}

// Sizes and strides of prefill_attention. The paged part (kv_cache, block_table, prefix_lens,
// slot_mapping) is optional: a pointer of 0 means "not given"; only presence is checked here.
inline void check_prefill_shapes(const PrefillAttentionArgs& a) {
  check_arg(a.batch >= 0 && a.batch <= kMaxInt32, "batch must be in [0, 2^31), got ", a.batch);
  check_arg(a.num_tokens >= 0 && a.num_tokens <= kMaxInt32, "num_tokens must be in [0, 2^31), got ",
            a.num_tokens);
  check_arg(a.max_seqlen_q >= 0 && a.max_seqlen_q <= kMaxInt32,
            "max_seqlen_q must be in [0, 2^31), got ", a.max_seqlen_q);
  check_gqa_heads(a.num_heads, a.num_kv_heads);
  check_arg(a.head_dim >= 1, "head_dim must be >= 1, got ", a.head_dim);
  // Checked for any num_tokens: the Python wrapper passes the row size for fewer than two rows.
  const int64_t q_row = a.num_heads * a.head_dim;
  const int64_t kv_row = a.num_kv_heads * a.head_dim;
  check_arg(a.query_token_stride >= q_row, "query_token_stride (", a.query_token_stride,
            ") must be >= num_heads * head_dim (", q_row, ")");
  check_arg(a.out_token_stride >= q_row, "out_token_stride (", a.out_token_stride,
            ") must be >= num_heads * head_dim (", q_row, ")");
  check_arg(a.key_token_stride >= kv_row, "key_token_stride (", a.key_token_stride,
            ") must be >= num_kv_heads * head_dim (", kv_row, ")");
  check_arg(a.value_token_stride >= kv_row, "value_token_stride (", a.value_token_stride,
            ") must be >= num_kv_heads * head_dim (", kv_row, ")");
  check_softmax_scale(a.softmax_scale);

  if (a.kv_cache == 0) {
    check_arg(a.block_table == 0 && a.prefix_lens == 0 && a.slot_mapping == 0,
              "block_table, prefix_lens and slot_mapping need a kv_cache (kv_cache is null)");
    return;
  }
  check_arg(a.num_blocks >= 1 && a.num_blocks <= kMaxInt32, "num_blocks must be in [1, 2^31), got ",
            a.num_blocks);
  check_arg(a.block_size >= 1 && a.block_size <= kMaxInt32, "block_size must be in [1, 2^31), got ",
            a.block_size);
  const int64_t block_numel = 2 * kv_row * a.block_size;
  check_arg(a.kv_block_stride >= block_numel, "kv_block_stride (", a.kv_block_stride,
            ") must be >= 2 * num_kv_heads * block_size * head_dim (", block_numel, ")");
  check_arg((a.block_table == 0) == (a.prefix_lens == 0),
            "block_table and prefix_lens must be given together");
  if (a.prefix_lens != 0) {
    check_arg(a.max_blocks_per_seq >= 1 && a.max_blocks_per_seq <= kMaxInt32,
              "max_blocks_per_seq must be in [1, 2^31) with prefix_lens, got ",
              a.max_blocks_per_seq);
  }
}

// The sizes decode_attention_workspace_bytes takes.
inline void check_decode_workspace_shapes(const DecodeWorkspaceArgs& a) {
  check_arg(a.batch >= 0, "batch must be >= 0, got ", a.batch);
  check_arg(a.num_heads >= 1, "num_heads must be >= 1, got ", a.num_heads);
  check_arg(a.head_dim >= 1, "head_dim must be >= 1, got ", a.head_dim);
  check_arg(a.max_seq_len >= 1, "max_seq_len must be >= 1, got ", a.max_seq_len);
}

// Sizes and strides (in elements) of decode_attention: one query token per sequence against
// kv_cache [num_blocks, 2, num_kv_heads, block_size, head_dim] through block_table
// [batch, max_blocks_per_seq] (int32 block ids; seq_lens are int32 too).
inline void check_decode_shapes(const DecodeAttentionArgs& a) {
  check_arg(a.batch >= 0, "batch must be >= 0, got ", a.batch);
  check_arg(a.max_seq_len >= 1, "max_seq_len must be >= 1, got ", a.max_seq_len);
  check_gqa_heads(a.num_heads, a.num_kv_heads);
  check_arg(a.head_dim >= 1, "head_dim must be >= 1, got ", a.head_dim);
  check_arg(a.block_size >= 1, "block_size must be >= 1, got ", a.block_size);
  check_arg(a.num_blocks >= 1 && a.num_blocks <= kMaxInt32, "num_blocks must be in [1, 2^31), got ",
            a.num_blocks);
  // A sequence's capacity, max_blocks_per_seq * block_size tokens, must fit an int.
  check_arg(a.max_blocks_per_seq >= 1 && a.max_blocks_per_seq <= kMaxInt32 / a.block_size,
            "max_blocks_per_seq must be in [1, ", kMaxInt32 / a.block_size, "], got ",
            a.max_blocks_per_seq);
  const int64_t row = a.num_heads * a.head_dim;
  check_arg(a.query_stride >= row, "query_stride (", a.query_stride,
            ") must be >= num_heads * head_dim (", row, ")");
  check_arg(a.out_stride >= row, "out_stride (", a.out_stride,
            ") must be >= num_heads * head_dim (", row, ")");
  const int64_t block_numel = 2 * a.num_kv_heads * a.block_size * a.head_dim;
  check_arg(a.kv_block_stride >= block_numel, "kv_block_stride (", a.kv_block_stride,
            ") must be >= 2 * num_kv_heads * block_size * head_dim (", block_numel, ")");
  check_softmax_scale(a.softmax_scale);
}

}  // namespace drt
