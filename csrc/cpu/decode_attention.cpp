// Launcher and bindings of the CPU decode attention (kernel: distserve_rt/cpu/decode_attention.h).
// Every value a caller can get wrong is checked here, including the data-dependent ones
// (seq_lens, the block ids they use, the workspace size) that the CUDA kernel can only guard.
#include "distserve_rt/cpu/decode_attention.h"

#include <omp.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/launcher.h"
#include "common/op_bindings.h"
#include "common/shape_checks.h"
#include "cpu/threads.h"

namespace py = pybind11;

namespace {

using drt::check_arg;

// This backend's own limits, after the rules shared with CUDA (common/shape_checks.h).
void check_sizes(const drt::cpu::DecodeAttentionParams& p) {
  check_arg(p.head_dim <= drt::cpu::kDecodeMaxHeadDim, "head_dim ", p.head_dim,
            " is not supported: must be in [1, ", drt::cpu::kDecodeMaxHeadDim, "]");
  check_arg(p.block_size <= drt::cpu::kDecodeMaxBlockSize, "block_size ", p.block_size,
            " is not supported: must be in [1, ", drt::cpu::kDecodeMaxBlockSize, "]");
  check_arg(p.batch == 0 || (p.query != nullptr && p.out != nullptr && p.kv_cache != nullptr &&
                             p.block_table != nullptr && p.seq_lens != nullptr),
            "query, out, kv_cache, block_table and seq_lens must be non-null pointers");
}

// Host loop over seq_lens and the block ids they reach: cheap next to the attention itself,
// and it turns a bad id into a ValueError instead of a read outside the pool.
void check_seq_lens_and_blocks(const drt::cpu::DecodeAttentionParams& p) {
  const int64_t capacity = p.max_blocks_per_seq * p.block_size;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.seq_lens[b];
    check_arg(len >= 1 && len <= p.max_seq_len, "seq_lens[", b, "] = ", len,
              " is out of range: must be in [1, max_seq_len = ", p.max_seq_len, "]");
    check_arg(len <= capacity, "seq_lens[", b, "] = ", len, " does not fit the block table: ",
              "max_blocks_per_seq * block_size = ", p.max_blocks_per_seq, " * ", p.block_size,
              " = ", capacity);
    const int32_t* row = p.block_table + b * p.max_blocks_per_seq;
    const int64_t used = (len + p.block_size - 1) / p.block_size;
    for (int64_t i = 0; i < used; ++i)
      check_arg(row[i] >= 0 && row[i] < p.num_blocks, "block_table[", b, "][", i, "] = ", row[i],
                " (used by seq_lens[", b, "] = ", len, ") is out of range: must be in [0, ",
                "num_blocks = ", p.num_blocks, ")");
  }
}

int64_t workspace_bytes(const drt::DecodeWorkspaceArgs& a) {
  drt::check_decode_workspace_shapes(a);
  return drt::cpu::decode_workspace_bytes_upper_bound(
      a.batch, a.num_heads, a.head_dim, a.max_seq_len, drt::cpu::effective_num_threads());
}

drt::cpu::DecodeAttentionParams make_params(const drt::DecodeAttentionArgs& a) {
  drt::cpu::DecodeAttentionParams p{};
  p.query = drt::as_ptr<const void>(a.query);
  p.out = drt::as_ptr<void>(a.out);
  p.kv_cache = drt::as_ptr<const void>(a.kv_cache);
  p.block_table = drt::as_ptr<const int32_t>(a.block_table);
  p.seq_lens = drt::as_ptr<const int32_t>(a.seq_lens);
  p.workspace = drt::as_ptr<void>(a.workspace);
  p.workspace_bytes = a.workspace_bytes;
  p.batch = a.batch;
  p.max_seq_len = a.max_seq_len;
  p.num_heads = a.num_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.query_stride = a.query_stride;
  p.out_stride = a.out_stride;
  p.softmax_scale = static_cast<float>(a.softmax_scale);
  p.num_blocks = a.num_blocks;
  p.block_size = a.block_size;
  p.kv_block_stride = a.kv_block_stride;
  p.max_blocks_per_seq = a.max_blocks_per_seq;
  return p;
}

void decode_attention(const drt::DecodeAttentionArgs& a) {
  const drt::DType dtype = drt::to_dtype(a.dtype);
  drt::check_decode_shapes(a);
  const drt::cpu::DecodeAttentionParams p = make_params(a);
  check_sizes(p);
  check_seq_lens_and_blocks(p);
  // The split plan depends on the thread count, so the workspace is checked against the plan
  // this call will run (what decode_attention_workspace_bytes returned bounds it).
  const drt::cpu::DecodeSplitPlan plan = drt::cpu::plan_decode_splits(
      a.batch, a.num_kv_heads, a.max_seq_len, a.block_size, drt::cpu::effective_num_threads());
  const int64_t needed = drt::cpu::decode_workspace_bytes(plan, a.batch, a.num_heads, a.head_dim);
  check_arg(a.workspace_bytes >= needed && (needed == 0 || a.workspace != 0), "workspace_bytes ",
            a.workspace_bytes, " is too small: this call needs ", needed,
            " (use decode_attention_workspace_bytes with the same batch, num_heads, head_dim, ",
            "max_seq_len and thread count)");
  drt::Status status;
  {
    py::gil_scoped_release release;
    status = DRT_CPU_DISPATCH_DTYPE(dtype, scalar_t,
                                    [&] { return drt::cpu::decode_attention<scalar_t>(p); });
  }
  drt::throw_if_error(status, "decode_attention");
}

}  // namespace

void register_decode_attention(py::module_& m) {
  drt::bindings::def_op(
      m, "decode_attention_workspace_bytes", drt::bindings::kDecodeWorkspaceFields,
      "Bytes of fp32 scratch decode_attention needs for these sizes with the current thread "
      "count (an upper bound over num_kv_heads and block_size); 0 when no split is needed.",
      &workspace_bytes);
  drt::bindings::def_op(
      m, "decode_attention", drt::bindings::kDecodeAttentionFields,
      "Paged decode attention, one query token per sequence (see decode_attention.h for the "
      "layouts). Pointers are ints, strides are in elements; raises ValueError on bad "
      "arguments, including seq_lens and block ids.",
      &decode_attention);
}
