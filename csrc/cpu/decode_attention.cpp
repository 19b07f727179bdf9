// Launcher and bindings of the CPU decode attention (kernel: distserve_rt/cpu/decode_attention.h).
// Every value a caller can get wrong is checked here, including the data-dependent ones
// (seq_lens, the block ids they use, the workspace size) that the CUDA kernel can only guard.
#include "distserve_rt/cpu/decode_attention.h"

#include <omp.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/launcher.h"
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

int64_t workspace_bytes(int64_t batch, int64_t num_heads, int64_t head_dim, int64_t max_seq_len) {
  drt::check_decode_workspace_shapes(batch, num_heads, head_dim, max_seq_len);
  return drt::cpu::decode_workspace_bytes_upper_bound(batch, num_heads, head_dim, max_seq_len,
                                                      drt::cpu::effective_num_threads());
}

void decode_attention(std::uintptr_t query, std::uintptr_t out, std::uintptr_t kv_cache,
                      std::uintptr_t block_table, std::uintptr_t seq_lens, std::uintptr_t workspace,
                      int64_t workspace_bytes, int64_t batch, int64_t max_seq_len,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t query_stride, int64_t out_stride, double softmax_scale,
                      int64_t num_blocks, int64_t block_size, int64_t kv_block_stride,
                      int64_t max_blocks_per_seq, int dtype_code) {
  const drt::DType dtype = drt::to_dtype(dtype_code);
  drt::check_decode_shapes(batch, max_seq_len, num_heads, num_kv_heads, head_dim, query_stride,
                           out_stride, softmax_scale, num_blocks, block_size, kv_block_stride,
                           max_blocks_per_seq);
  drt::cpu::DecodeAttentionParams p{drt::as_ptr<const void>(query),
                                    drt::as_ptr<void>(out),
                                    drt::as_ptr<const void>(kv_cache),
                                    drt::as_ptr<const int32_t>(block_table),
                                    drt::as_ptr<const int32_t>(seq_lens),
                                    drt::as_ptr<void>(workspace),
                                    workspace_bytes,
                                    batch,
                                    max_seq_len,
                                    num_heads,
                                    num_kv_heads,
                                    head_dim,
                                    query_stride,
                                    out_stride,
                                    static_cast<float>(softmax_scale),
                                    num_blocks,
                                    block_size,
                                    kv_block_stride,
                                    max_blocks_per_seq};
  check_sizes(p);
  check_seq_lens_and_blocks(p);
  // The split plan depends on the thread count, so the workspace is checked against the plan
  // this call will run (what decode_attention_workspace_bytes returned bounds it).
  const drt::cpu::DecodeSplitPlan plan = drt::cpu::plan_decode_splits(
      batch, num_kv_heads, max_seq_len, block_size, drt::cpu::effective_num_threads());
  const int64_t needed = drt::cpu::decode_workspace_bytes(plan, batch, num_heads, head_dim);
  check_arg(workspace_bytes >= needed && (needed == 0 || workspace != 0), "workspace_bytes ",
            workspace_bytes, " is too small: this call needs ", needed,
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
  m.def("decode_attention_workspace_bytes", &workspace_bytes, py::arg("batch"),
        py::arg("num_heads"), py::arg("head_dim"), py::arg("max_seq_len"),
        "Bytes of fp32 scratch decode_attention needs for these sizes with the current thread "
        "count (an upper bound over num_kv_heads and block_size); 0 when no split is needed.");
  m.def("decode_attention", &decode_attention, py::arg("query"), py::arg("out"),
        py::arg("kv_cache"), py::arg("block_table"), py::arg("seq_lens"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("batch"), py::arg("max_seq_len"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("query_stride"),
        py::arg("out_stride"), py::arg("softmax_scale"), py::arg("num_blocks"),
        py::arg("block_size"), py::arg("kv_block_stride"), py::arg("max_blocks_per_seq"),
        py::arg("dtype"),
        "Paged decode attention, one query token per sequence (see decode_attention.h for the "
        "layouts). Pointers are ints, strides are in elements; raises ValueError on bad "
        "arguments, including seq_lens and block ids.");
}
