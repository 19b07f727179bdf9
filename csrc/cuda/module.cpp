// The CUDA module `distserve_rt._cuda`. Bindings are compiled by the host compiler; kernels
// live in .cu files that expose plain C++ launchers (cuda/ops.h; no pybind11 through nvcc).
// Every op takes the CPU module's keyword-only arguments (common/op_bindings.h) plus
// `stream`, and releases the GIL: launches are asynchronous, but argument checks and
// cudaMemcpyBatchAsync's host work should not hold up other Python threads.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/op_bindings.h"
#include "cuda/ops.h"
#include "cuda/transfer.h"

namespace py = pybind11;
namespace ops = drt::cuda_ops;
using py::arg;

namespace {

using drt::bindings::def_op;

// The launchers run without the GIL (the keywords are read with it, in def_op): launches
// are asynchronous, but the checks and cudaMemcpyBatchAsync's host work take time.
template <typename Args>
auto without_gil(void (*launch)(const Args&, std::uintptr_t)) {
  return [launch](const Args& args, std::uintptr_t stream) {
    py::gil_scoped_release release;
    launch(args, stream);
  };
}

void register_cache_ops(py::module_& m) {
  def_op(m, "write_kv", drt::bindings::kWriteKVFields,
         "Scatters key/value [num_tokens, num_kv_heads, head_dim] into kv_cache "
         "[num_blocks, 2, num_kv_heads, block_size, head_dim] at slot_mapping; slots < 0 "
         "(padding) or >= num_blocks * block_size are skipped.",
         without_gil(&ops::write_kv), "stream");
  def_op(m, "copy_blocks", drt::bindings::kCopyBlocksFields,
         "Copies block_bytes from src + s * src_block_stride_bytes to dst + d * "
         "dst_block_stride_bytes for each (s, d) row of block_mapping (int64 [num_pairs, 2], "
         "device memory) in one kernel; ids out of range are skipped.",
         without_gil(&ops::copy_blocks), "stream");
  def_op(m, "copy_blocks_memcpy_batch", drt::bindings::kCopyBlocksFields,
         "copy_blocks through cudaMemcpyBatchAsync (copy engines); block_mapping is in HOST "
         "memory here, ids out of range raise ValueError; needs a non-default stream.",
         without_gil(&ops::copy_blocks_memcpy_batch), "stream");
}

void register_attention(py::module_& m) {
  def_op(m, "prefill_attention", drt::bindings::kPrefillAttentionFields,
         "Causal varlen attention over cu_seqlens (GQA), optionally after a paged prefix "
         "(prefix_lens, block_table) and writing the new K/V into kv_cache (slot_mapping).",
         without_gil(&ops::prefill_attention), "stream");
  // `stream` is accepted (and unused) so every op of this module is called the same way.
  def_op(
      m, "decode_attention_workspace_bytes", drt::bindings::kDecodeWorkspaceFields,
      "Bytes of scratch decode_attention needs for these sizes (0: none).",
      [](const drt::DecodeWorkspaceArgs& args, std::uintptr_t /*stream*/) {
        return ops::decode_attention_workspace_bytes(args);
      },
      "stream");
  def_op(m, "decode_attention", drt::bindings::kDecodeAttentionFields,
         "Paged split-K decode attention, one query token per sequence; no host "
         "synchronisation (capturable in a CUDA graph).",
         without_gil(&ops::decode_attention), "stream");
}

void register_devices(py::module_& m) {
  // Number of visible devices; 0 (not an error) when there is no driver or no device, so
  // callers can probe without a GPU.
  m.def("device_count", []() {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return count;
  });
  m.def("can_access_peer", &ops::can_access_peer,
        "Whether kernels on `device` can read and write `peer_device`'s memory (P2P).",
        py::kw_only(), arg("device"), arg("peer_device"));
  m.def("enable_peer_access", &ops::enable_peer_access,
        "Maps `peer_device`'s memory into `device`'s kernels; RuntimeError when no "
        "peer-to-peer path exists. Enabling twice is fine.",
        py::kw_only(), arg("device"), arg("peer_device"));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "distserve_rt CUDA kernels (same ABI as distserve_rt._C plus a `stream` keyword)";
  register_cache_ops(m);
  register_attention(m);
  register_devices(m);
  ops::register_transfer(m);  // transfer_ipc.cpp: IpcTransferEngine (cuda_ipc backend)
}
