// The CUDA module `distserve_rt._cuda`. Bindings are compiled by the host compiler; kernels
// live in .cu files that expose plain C++ launchers (cuda/ops.h; no pybind11 through nvcc).
// Every op takes the CPU module's arguments plus a trailing `stream` and releases the GIL:
// launches are asynchronous, but argument checks and cudaMemcpyBatchAsync's host work
// should not hold up other Python threads.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cuda/ops.h"
#include "cuda/transfer.h"

namespace py = pybind11;
namespace ops = drt::cuda_ops;
using py::arg;

namespace {

using release_gil = py::call_guard<py::gil_scoped_release>;

void register_cache_ops(py::module_& m) {
  m.def("write_kv", &ops::write_kv, release_gil(),
        "Scatters key/value [num_tokens, num_kv_heads, head_dim] into kv_cache "
        "[num_blocks, 2, num_kv_heads, block_size, head_dim] at slot_mapping; slots < 0 "
        "(padding) or >= num_blocks * block_size are skipped.",
        arg("key"), arg("value"), arg("kv_cache"), arg("slot_mapping"), arg("num_tokens"),
        arg("num_kv_heads"), arg("head_dim"), arg("key_token_stride"), arg("value_token_stride"),
        arg("num_blocks"), arg("block_size"), arg("kv_block_stride"), arg("dtype"), arg("stream"));
  m.def("copy_blocks", &ops::copy_blocks, release_gil(),
        "Copies block_bytes from src + s * src_block_stride_bytes to dst + d * "
        "dst_block_stride_bytes for each (s, d) row of block_mapping (int64 [num_pairs, 2], "
        "device memory) in one kernel; ids out of range are skipped.",
        arg("src"), arg("dst"), arg("block_mapping"), arg("num_pairs"), arg("src_num_blocks"),
        arg("dst_num_blocks"), arg("src_block_stride_bytes"), arg("dst_block_stride_bytes"),
        arg("block_bytes"), arg("stream"));
  m.def("copy_blocks_memcpy_batch", &ops::copy_blocks_memcpy_batch, release_gil(),
        "copy_blocks through cudaMemcpyBatchAsync (copy engines); block_mapping is in HOST "
        "memory here, ids out of range raise ValueError; needs a non-default stream.",
        arg("src"), arg("dst"), arg("block_mapping"), arg("num_pairs"), arg("src_num_blocks"),
        arg("dst_num_blocks"), arg("src_block_stride_bytes"), arg("dst_block_stride_bytes"),
        arg("block_bytes"), arg("stream"));
}

void register_attention(py::module_& m) {
  m.def("prefill_attention", &ops::prefill_attention, release_gil(),
        "Causal varlen attention over cu_seqlens (GQA), optionally after a paged prefix "
        "(prefix_lens, block_table) and writing the new K/V into kv_cache (slot_mapping).",
        arg("query"), arg("key"), arg("value"), arg("out"), arg("cu_seqlens"), arg("batch"),
        arg("num_tokens"), arg("max_seqlen_q"), arg("num_heads"), arg("num_kv_heads"),
        arg("head_dim"), arg("query_token_stride"), arg("key_token_stride"),
        arg("value_token_stride"), arg("out_token_stride"), arg("softmax_scale"), arg("kv_cache"),
        arg("block_table"), arg("prefix_lens"), arg("slot_mapping"), arg("num_blocks"),
        arg("block_size"), arg("kv_block_stride"), arg("max_blocks_per_seq"), arg("dtype"),
        arg("stream"));
  m.def("decode_attention_workspace_bytes", &ops::decode_attention_workspace_bytes,
        "Bytes of scratch decode_attention needs for these sizes (0: none).", arg("batch"),
        arg("num_heads"), arg("head_dim"), arg("max_seq_len"), arg("stream"));
  m.def("decode_attention", &ops::decode_attention, release_gil(),
        "Paged split-K decode attention, one query token per sequence; no host "
        "synchronisation (capturable in a CUDA graph).",
        arg("query"), arg("out"), arg("kv_cache"), arg("block_table"), arg("seq_lens"),
        arg("workspace"), arg("workspace_bytes"), arg("batch"), arg("max_seq_len"),
        arg("num_heads"), arg("num_kv_heads"), arg("head_dim"), arg("query_stride"),
        arg("out_stride"), arg("softmax_scale"), arg("num_blocks"), arg("block_size"),
        arg("kv_block_stride"), arg("max_blocks_per_seq"), arg("dtype"), arg("stream"));
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
        arg("device"), arg("peer_device"));
  m.def("enable_peer_access", &ops::enable_peer_access,
        "Maps `peer_device`'s memory into `device`'s kernels; RuntimeError when no "
        "peer-to-peer path exists. Enabling twice is fine.",
        arg("device"), arg("peer_device"));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "distserve_rt CUDA kernels (same ABI as distserve_rt._C plus a trailing stream)";
  register_cache_ops(m);
  register_attention(m);
  register_devices(m);
  ops::register_transfer(m);  // transfer_ipc.cpp: IpcTransferEngine (cuda_ipc backend)
}
