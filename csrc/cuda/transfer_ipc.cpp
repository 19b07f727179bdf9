// The cuda_ipc transfer engine: a decode process pulls block slices from a prefill
// process's pool on the same node through CUDA IPC.
//
// Producer: export_memory(pool) -> IPC handle of the allocation base + the pool's offset in
// it (torch's caching allocator hands out sub-blocks of larger cudaMalloc's, and IPC works
// on whole allocations); create_event() -> an interprocess event it records after each
// prefill step (record_event). Consumer: open_memory / open_event once per peer (cached by
// Python), then submit: the dedicated copy stream waits on the producer's event, uploads
// the block mapping, runs the block-slice kernel (or cudaMemcpyBatchAsync), records a
// completion event and stamps the end time from a host callback.
//
// Lifetime contract: the producer keeps its pool allocated and registered until every
// transfer reading it reached a final status; IPC mappings are closed at close().
#include <cuda.h>  // driver types only: entry points come from cudaGetDriverEntryPointByVersion
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/launcher.h"
#include "common/transfer_checks.h"
#include "common/transfer_registry.h"
#include "cuda/cuda_utils.h"
#include "cuda/transfer.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace drt::cuda_ops {
namespace {

using transfer::PoolTuple;
using transfer::SliceCopyParams;
using transfer::SliceTuple;
using transfer::TransferRegistry;
using transfer::TransferState;

// Base and size of the cudaMalloc allocation holding `ptr` (driver cuMemGetAddressRange;
// the runtime is linked statically, so the driver entry point is looked up at run time).
std::pair<std::uintptr_t, int64_t> allocation_range(std::uintptr_t ptr) {
  using Fn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static Fn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000,
                                                cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuMemGetAddressRange)");
    check_arg(found == cudaDriverEntryPointSuccess && f != nullptr,
              "the CUDA driver has no cuMemGetAddressRange");
    return reinterpret_cast<Fn>(f);
  }();
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUresult rc = fn(&base, &size, static_cast<CUdeviceptr>(ptr));
  check_arg(rc == CUDA_SUCCESS, "cuMemGetAddressRange failed (CUresult ", static_cast<int>(rc),
            "): the pool is not device memory from cudaMalloc (torch's caching allocator)");
  return {static_cast<std::uintptr_t>(base), static_cast<int64_t>(size)};
}

template <typename Handle>
py::bytes to_bytes(const Handle& h) {
  return py::bytes(reinterpret_cast<const char*>(&h), sizeof(Handle));
}

template <typename Handle>
Handle from_bytes(const std::string& data, const char* what) {
  check_arg(data.size() == sizeof(Handle), what, " must be ", sizeof(Handle), " bytes, got ",
            data.size());
  Handle h{};
  std::memcpy(&h, data.data(), sizeof(Handle));
  return h;
}

// Makes the engine's device current for one call.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Every value submit checks, without touching CUDA (also bound alone for tests without a
// GPU). Returns the params with pointers left null.
SliceCopyParams checked_params(const PoolTuple& src_pool, const PoolTuple& dst_pool,
                               int64_t head_bytes, const SliceTuple& slice,
                               std::uintptr_t block_mapping, int64_t num_pairs) {
  SliceCopyParams p{};
  p.src_pool = transfer::to_geometry(src_pool, "source");
  p.dst_pool = transfer::to_geometry(dst_pool, "destination");
  p.head_bytes = head_bytes;
  p.slice = transfer::to_slice(slice);
  p.num_pairs = num_pairs;
  transfer::check_slice_params(p);
  check_arg(num_pairs == 0 || block_mapping != 0, "block_mapping must be a non-null pointer");
  transfer::check_transfer_mapping(as_ptr<const int64_t>(block_mapping), num_pairs,
                                   p.src_pool.num_blocks, p.dst_pool.num_blocks);
  return p;
}

struct HostStamp {
  TransferRegistry* registry;
  int64_t id;
};

class IpcTransferEngine {
 public:
  IpcTransferEngine(int device, const std::string& method) : device_(device) {
    check_arg(method == "kernel" || method == "memcpy_batch", "method must be 'kernel' or ",
              "'memcpy_batch', got '", method, "'");
    use_kernel_ = method == "kernel";
    DeviceGuard guard(device_);
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~IpcTransferEngine() { close(); }
  IpcTransferEngine(const IpcTransferEngine&) = delete;
  IpcTransferEngine& operator=(const IpcTransferEngine&) = delete;

  // (IPC handle bytes, pool offset in the allocation, allocation bytes) of a local pool.
  py::tuple export_memory(std::uintptr_t ptr) {
    DeviceGuard guard(device_);
    const auto [base, size] = allocation_range(ptr);
    cudaIpcMemHandle_t handle{};
    check_cuda(cudaIpcGetMemHandle(&handle, as_ptr<void>(base)), "cudaIpcGetMemHandle");
    return py::make_tuple(to_bytes(handle), static_cast<int64_t>(ptr - base), size);
  }

  // An interprocess event of this process (id, IPC handle bytes) the producer records.
  py::tuple create_event() {
    DeviceGuard guard(device_);
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventInterprocess),
               "cudaEventCreateWithFlags(interprocess)");
    cudaIpcEventHandle_t handle{};
    check_cuda(cudaIpcGetEventHandle(&handle, event), "cudaIpcGetEventHandle");
    std::lock_guard<std::mutex> lock(mutex_);
    events_[next_id_] = event;
    return py::make_tuple(next_id_++, to_bytes(handle));
  }

  void record_event(int64_t event, std::uintptr_t stream) {
    DeviceGuard guard(device_);
    check_cuda(cudaEventRecord(find(events_, event, "event"), as_stream(stream)),
               "cudaEventRecord");
  }

  int64_t open_memory(const std::string& handle_bytes) {
    const auto handle = from_bytes<cudaIpcMemHandle_t>(handle_bytes, "the IPC memory handle");
    DeviceGuard guard(device_);
    void* base = nullptr;
    check_cuda(cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess),
               "cudaIpcOpenMemHandle (the peer's pool)");
    std::lock_guard<std::mutex> lock(mutex_);
    regions_[next_id_] = base;
    return next_id_++;
  }

  int64_t open_event(const std::string& handle_bytes) {
    const auto handle = from_bytes<cudaIpcEventHandle_t>(handle_bytes, "the IPC event handle");
    DeviceGuard guard(device_);
    cudaEvent_t event = nullptr;
    check_cuda(cudaIpcOpenEventHandle(&event, handle), "cudaIpcOpenEventHandle");
    std::lock_guard<std::mutex> lock(mutex_);
    events_[next_id_] = event;
    return next_id_++;
  }

  int64_t submit(int64_t region, int64_t src_offset, const PoolTuple& src_pool, std::uintptr_t dst,
                 const PoolTuple& dst_pool, int64_t head_bytes, const SliceTuple& slice,
                 std::uintptr_t block_mapping, int64_t num_pairs, int64_t ready_event) {
    SliceCopyParams p =
        checked_params(src_pool, dst_pool, head_bytes, slice, block_mapping, num_pairs);
    check_arg(dst != 0, "dst must be a non-null pointer");
    std::lock_guard<std::mutex> lock(mutex_);
    check_arg(stream_ != nullptr, "the transfer engine is closed");
    p.src = static_cast<const char*>(find(regions_, region, "region")) + src_offset;
    p.dst = as_ptr<char>(dst);
    cudaEvent_t ready = ready_event > 0 ? find(events_, ready_event, "event") : nullptr;
    DeviceGuard guard(device_);
    const int64_t id = registry_.add(num_pairs * transfer::slice_bytes_per_pair(p));
    try {
      enqueue(p, as_ptr<const int64_t>(block_mapping), ready, id);
    } catch (const std::exception& e) {
      registry_.set_state(id, TransferState::kFailed, e.what());
    }
    return id;
  }

  // Moves a transfer forward from its completion event; returns the snapshot.
  transfer::TransferSnapshot poll(int64_t id) {
    refresh(id);
    return registry_.snapshot(id);
  }

  // Waits in 1 ms slices so that a failed copy (whose host callback never runs) is seen.
  transfer::TransferSnapshot wait(int64_t id, double timeout_s) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(std::max(timeout_s, 0.0)));
    while (true) {
      refresh(id);
      const auto left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now());
      if (transfer::is_final(registry_.state(id)) || left.count() <= 0) break;
      registry_.wait(id, std::min(left.count(), 1e-3));
    }
    return registry_.snapshot(id);
  }

  void release(int64_t id) {
    registry_.release(id);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = done_events_.find(id);
    if (it != done_events_.end()) {
      cudaEventDestroy(it->second);
      done_events_.erase(it);
    }
  }

  TransferRegistry& registry() { return registry_; }

  // Waits for queued copies, then closes IPC mappings and events. Idempotent.
  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stream_ == nullptr) return;
    DeviceGuard guard(device_);
    cudaStreamSynchronize(stream_);  // best effort: a failed copy must not stop the cleanup
    for (auto& [id, base] : regions_) cudaIpcCloseMemHandle(base);
    for (auto& [id, event] : events_) cudaEventDestroy(event);
    for (auto& [id, event] : done_events_) cudaEventDestroy(event);
    regions_.clear();
    events_.clear();
    done_events_.clear();
    cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }

 private:
  template <typename T>
  static T find(std::unordered_map<int64_t, T>& map, int64_t id, const char* what) {
    auto it = map.find(id);
    check_arg(it != map.end(), "unknown ", what, " id ", id, " (not opened by this engine)");
    return it->second;
  }

  void enqueue(SliceCopyParams& p, const int64_t* host_mapping, cudaEvent_t ready, int64_t id) {
    if (ready != nullptr) check_cuda(cudaStreamWaitEvent(stream_, ready, 0), "cudaStreamWaitEvent");
    registry_.set_state(id, TransferState::kTransferring);
    if (p.num_pairs > 0) {
      use_kernel_ ? enqueue_kernel(p, host_mapping) : enqueue_memcpy_batch(p, host_mapping);
    }
    cudaEvent_t done = nullptr;
    check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    done_events_[id] = done;
    check_cuda(cudaEventRecord(done, stream_), "cudaEventRecord(done)");
    // The callback stamps SUCCESS when the stream gets there (it runs on a driver thread and
    // makes no CUDA calls); if the copy faults it never runs and refresh() reports the error.
    auto* stamp = new HostStamp{&registry_, id};
    check_cuda(cudaLaunchHostFunc(
                   stream_,
                   [](void* data) {
                     auto* s = static_cast<HostStamp*>(data);
                     s->registry->set_state(s->id, TransferState::kSuccess);
                     delete s;
                   },
                   stamp),
               "cudaLaunchHostFunc");
  }

  void enqueue_kernel(SliceCopyParams& p, const int64_t* host_mapping) {
    const std::size_t bytes = static_cast<std::size_t>(p.num_pairs) * 2 * sizeof(int64_t);
    void* mapping = nullptr;
    check_cuda(cudaMallocAsync(&mapping, bytes, stream_), "cudaMallocAsync(block_mapping)");
    // Pageable source: the call returns once the bytes are staged, so Python may free them.
    check_cuda(cudaMemcpyAsync(mapping, host_mapping, bytes, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync(block_mapping)");
    p.block_mapping = static_cast<const int64_t*>(mapping);
    check_cuda(launch_block_slices(p, stream_), "block-slice kernel launch");
    check_cuda(cudaFreeAsync(mapping, stream_), "cudaFreeAsync(block_mapping)");
  }

  void enqueue_memcpy_batch(const SliceCopyParams& p, const int64_t* host_mapping) {
    const transfer::SliceRuns runs = transfer::slice_runs(p);
    const std::size_t count = static_cast<std::size_t>(p.num_pairs * runs.num_runs);
    std::vector<void*> dsts(count);
    std::vector<const void*> srcs(count);
    std::vector<size_t> sizes(count, static_cast<size_t>(runs.run_bytes));
    for (int64_t pair = 0, k = 0; pair < p.num_pairs; ++pair) {
      const char* src = p.src + host_mapping[2 * pair] * p.src_pool.block_stride_bytes;
      char* dst = p.dst + host_mapping[2 * pair + 1] * p.dst_pool.block_stride_bytes;
      for (int64_t run = 0; run < runs.num_runs; ++run, ++k) {
        srcs[k] = src + transfer::slice_run_offset(p, run, true);
        dsts[k] = dst + transfer::slice_run_offset(p, run, false);
      }
    }
    cudaMemcpyAttributes attrs{};
    attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attrs.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attrs_index = 0;
    check_cuda(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count, &attrs,
                                    &attrs_index, 1, stream_),
               "cudaMemcpyBatchAsync");
  }

  void refresh(int64_t id) {
    if (transfer::is_final(registry_.state(id))) return;
    cudaEvent_t done = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = done_events_.find(id);
      if (it == done_events_.end()) return;
      done = it->second;
    }
    DeviceGuard guard(device_);
    const cudaError_t err = cudaEventQuery(done);
    if (err == cudaSuccess) {
      registry_.set_state(id, TransferState::kSuccess);
    } else if (err != cudaErrorNotReady) {
      registry_.set_state(id, TransferState::kFailed,
                          std::string("the copy failed on the GPU: ") + cudaGetErrorName(err) +
                              ": " + cudaGetErrorString(err));
    }
  }

  const int device_;
  bool use_kernel_ = true;
  cudaStream_t stream_ = nullptr;
  std::mutex mutex_;  // guards the maps and stream_
  std::unordered_map<int64_t, void*> regions_;
  std::unordered_map<int64_t, cudaEvent_t> events_;
  std::unordered_map<int64_t, cudaEvent_t> done_events_;
  int64_t next_id_ = 1;
  TransferRegistry registry_;
};

}  // namespace

void register_transfer(py::module_& m) {
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def(
      "check_ipc_transfer_args",
      [](const PoolTuple& src_pool, const PoolTuple& dst_pool, int64_t head_bytes,
         const SliceTuple& slice, std::uintptr_t block_mapping, int64_t num_pairs) {
        checked_params(src_pool, dst_pool, head_bytes, slice, block_mapping, num_pairs);
      },
      "The checks IpcTransferEngine.submit runs first (no CUDA call): ValueError on a bad "
      "slice, pool or block id.",
      "src_pool"_a, "dst_pool"_a, "head_bytes"_a, "slice"_a, "block_mapping"_a, "num_pairs"_a);
  py::class_<IpcTransferEngine>(m, "IpcTransferEngine",
                                "Pulls block slices from peers' CUDA pools over CUDA IPC.")
      .def(py::init<int, const std::string&>(), "device"_a, "method"_a)
      .def("export_memory", &IpcTransferEngine::export_memory, "ptr"_a)
      .def("create_event", &IpcTransferEngine::create_event)
      .def("record_event", &IpcTransferEngine::record_event, "event"_a, "stream"_a)
      .def("open_memory", &IpcTransferEngine::open_memory, "handle"_a)
      .def("open_event", &IpcTransferEngine::open_event, "handle"_a)
      .def("submit", &IpcTransferEngine::submit, release_gil(), "region"_a, "src_offset"_a,
           "src_pool"_a, "dst"_a, "dst_pool"_a, "head_bytes"_a, "slice"_a, "block_mapping"_a,
           "num_pairs"_a, "ready_event"_a)
      .def("poll", &IpcTransferEngine::poll, "transfer"_a)
      .def("wait", &IpcTransferEngine::wait, release_gil(), "transfer"_a, "timeout_s"_a)
      .def("release", &IpcTransferEngine::release, "transfer"_a)
      .def("stats", [](IpcTransferEngine& e) { return e.registry().totals(); })
      .def("close", &IpcTransferEngine::close, release_gil());
}

}  // namespace drt::cuda_ops
