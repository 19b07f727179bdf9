// The CPU transfer engine of the `shm` backend: the consumer (decode side) maps a peer's
// KV pool from POSIX shared memory once, then pulls batches of block slices into its own
// pool on a worker thread, so submit returns at once and Python polls or waits.
//
// Lifetime contract: the owner (prefill side) keeps its pool registered (the shm name
// linked) until every transfer that reads it reached a final status. A region unlinked
// before its transfer starts makes that transfer FAILED; the mapping itself stays valid
// (POSIX keeps unlinked memory alive while mapped), so a late unlink can never fault here.
#include <fcntl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/launcher.h"
#include "common/transfer_checks.h"
#include "common/transfer_registry.h"
#include "distserve_rt/transfer/block_slice.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace drt::transfer {
namespace {

// A peer's pool mapped read-only into this process.
struct Region {
  std::string name;
  int fd = -1;
  const char* base = nullptr;
  int64_t nbytes = 0;
  int64_t num_in_flight = 0;  // queued or running batches reading it
};

struct Batch {
  int64_t id;
  int64_t region;
  SliceCopyParams params;        // params.block_mapping points into `mapping`
  std::vector<int64_t> mapping;  // [num_pairs, 2], owned: Python's array may be freed
};

class ShmTransferEngine {
 public:
  // spin_us: how long the worker spins for new work after each batch, and wait() for the
  // final status, before sleeping (a core busy for at most that long after activity buys
  // back the ~2 x 25 us of futex hand-offs a small transfer otherwise pays in a VM).
  ShmTransferEngine(int num_copy_threads, double spin_us)
      : num_copy_threads_(num_copy_threads), spin_s_(spin_us * 1e-6) {
    check_arg(num_copy_threads >= 1, "num_copy_threads must be >= 1, got ", num_copy_threads);
    check_arg(spin_us >= 0 && spin_us <= 1e6, "spin_us must be in [0, 1e6], got ", spin_us);
    worker_ = std::thread([this] { run_worker(); });
  }
  ~ShmTransferEngine() { close(); }
  ShmTransferEngine(const ShmTransferEngine&) = delete;
  ShmTransferEngine& operator=(const ShmTransferEngine&) = delete;

  // Maps shm `name` (as under /dev/shm, no slash) read-only. Returns a region id > 0, or
  // -errno when the region cannot be opened (status code, not exception: Python names the
  // error), or -EOVERFLOW when it is smaller than `nbytes`.
  int64_t open_region(const std::string& name, int64_t nbytes) {
    check_arg(nbytes >= 1, "nbytes must be >= 1, got ", nbytes);
    const int fd = shm_open(("/" + name).c_str(), O_RDONLY, 0);
    if (fd < 0) return -errno;
    struct stat st{};
    if (fstat(fd, &st) != 0 || st.st_size < nbytes) {
      ::close(fd);
      return -EOVERFLOW;
    }
    // MAP_POPULATE: fault the page tables in now, not during the first transfer.
    void* base = mmap(nullptr, static_cast<std::size_t>(nbytes), PROT_READ,
                      MAP_SHARED | MAP_POPULATE, fd, 0);
    if (base == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return -err;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = next_region_++;
    regions_[id] = Region{name, fd, static_cast<const char*>(base), nbytes, 0};
    return id;
  }

  void close_region(int64_t region) {
    std::lock_guard<std::mutex> lock(mutex_);
    Region& r = find_region(region);
    check_arg(r.num_in_flight == 0, "region '", r.name, "' has ", r.num_in_flight,
              " transfers in flight; close it after they reach a final status");
    unmap(r);
    regions_.erase(region);
  }

  // False once the owner unlinked the region (closed its pool or exited cleanly).
  bool region_alive(int64_t region) {
    std::lock_guard<std::mutex> lock(mutex_);
    return is_linked(find_region(region).fd);
  }

  int64_t submit(int64_t region, int64_t src_offset, const PoolTuple& src_pool, std::uintptr_t dst,
                 const PoolTuple& dst_pool, int64_t head_bytes, const SliceTuple& slice,
                 std::uintptr_t block_mapping, int64_t num_pairs) {
    Batch batch{0, region, {}, {}};
    SliceCopyParams& p = batch.params;
    p.src_pool = to_geometry(src_pool, "source");
    p.dst_pool = to_geometry(dst_pool, "destination");
    p.head_bytes = head_bytes;
    p.slice = to_slice(slice);
    p.num_pairs = num_pairs;
    check_slice_params(p);
    check_arg(dst != 0, "dst must be a non-null pointer");
    check_arg(num_pairs == 0 || block_mapping != 0, "block_mapping must be a non-null pointer");
    const auto* pairs = as_ptr<const int64_t>(block_mapping);
    check_transfer_mapping(pairs, num_pairs, p.src_pool.num_blocks, p.dst_pool.num_blocks);
    batch.mapping.assign(pairs, pairs + 2 * num_pairs);
    p.block_mapping = batch.mapping.data();
    p.dst = as_ptr<char>(dst);

    std::lock_guard<std::mutex> lock(mutex_);
    check_arg(!closed_, "the transfer engine is closed");
    Region& r = find_region(region);
    const int64_t src_end = src_offset +
                            (p.src_pool.num_blocks - 1) * p.src_pool.block_stride_bytes +
                            p.src_pool.num_layers * 2 * p.src_pool.num_kv_heads * head_bytes;
    check_arg(src_offset >= 0 && src_end <= r.nbytes, "the source pool [", src_offset, ", ",
              src_end, ") does not fit region '", r.name, "' of ", r.nbytes, " bytes");
    p.src = r.base + src_offset;
    batch.id = registry_.add(num_pairs * slice_bytes_per_pair(p));
    ++r.num_in_flight;
    const int64_t id = batch.id;
    queue_.push_back(std::move(batch));
    num_queued_.fetch_add(1, std::memory_order_release);
    work_.notify_one();
    return id;
  }

  TransferRegistry& registry() { return registry_; }
  // How long wait() polls before sleeping: spin_s plus the time the copy should take at a
  // modest 5 GB/s (capped at 2 ms), so that a waiter on a request of a few MiB is not
  // charged a futex wake-up (~25 us in a VM) on top of the copy. Polling yields the core.
  double wait_spin_s(int64_t id) {
    const int64_t num_bytes = std::get<2>(registry_.snapshot(id));
    return spin_s_ > 0 ? spin_s_ + std::min(2e-3, static_cast<double>(num_bytes) / 5e9) : 0.0;
  }

  // Stops the worker after the running batch; queued batches become FAILED. Unmaps every
  // region. Idempotent.
  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return;
      closed_ = true;
      stopping_.store(true);
    }
    work_.notify_all();
    if (worker_.joinable()) worker_.join();
    std::lock_guard<std::mutex> lock(mutex_);
    for (Batch& b : queue_) {
      registry_.set_state(b.id, TransferState::kFailed,
                          "the transfer engine was closed before the copy started");
    }
    queue_.clear();
    for (auto& [id, r] : regions_) unmap(r);
    regions_.clear();
  }

 private:
  static bool is_linked(int fd) {
    struct stat st{};
    return fstat(fd, &st) == 0 && st.st_nlink > 0;
  }

  static void unmap(Region& r) {
    if (r.base != nullptr) munmap(const_cast<char*>(r.base), static_cast<std::size_t>(r.nbytes));
    if (r.fd >= 0) ::close(r.fd);
    r.base = nullptr;
    r.fd = -1;
  }

  Region& find_region(int64_t region) {
    auto it = regions_.find(region);
    check_arg(it != regions_.end(), "unknown region id ", region,
              " (not opened by this engine, or closed)");
    return it->second;
  }

  void run_worker() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      if (queue_.empty() && !closed_) {
        lock.unlock();
        spin_until(
            [&] { return num_queued_.load(std::memory_order_acquire) > 0 || stopping_.load(); },
            spin_s_);
        lock.lock();
      }
      work_.wait(lock, [&] { return closed_ || !queue_.empty(); });
      if (closed_) return;
      Batch batch = std::move(queue_.front());
      queue_.pop_front();
      num_queued_.fetch_sub(1, std::memory_order_relaxed);
      batch.params.block_mapping = batch.mapping.data();
      const int fd = find_region(batch.region).fd;
      lock.unlock();
      run_batch(batch, fd);
      lock.lock();
      --find_region(batch.region).num_in_flight;
    }
  }

  void run_batch(const Batch& batch, int fd) {
    registry_.set_state(batch.id, TransferState::kTransferring);
    if (!is_linked(fd)) {
      registry_.set_state(batch.id, TransferState::kFailed,
                          "the source region was unlinked before the copy: its owner closed "
                          "the pool or exited, so its blocks may be stale or freed");
      return;
    }
    const Status status = copy_block_slices(batch.params, num_copy_threads_);
    if (status == Status::kOk) {
      registry_.set_state(batch.id, TransferState::kSuccess);
    } else {
      registry_.set_state(batch.id, TransferState::kFailed,
                          std::string("block copy failed: ") + status_name(status));
    }
  }

  const int num_copy_threads_;
  const double spin_s_;
  std::atomic<int64_t> num_queued_{0};  // queue_.size(), read by the spinning worker
  std::atomic<bool> stopping_{false};   // closed_, read by the spinning worker
  std::mutex mutex_;                    // guards regions_, queue_, closed_
  std::condition_variable work_;
  std::unordered_map<int64_t, Region> regions_;
  int64_t next_region_ = 1;
  std::deque<Batch> queue_;
  bool closed_ = false;
  TransferRegistry registry_;
  std::thread worker_;  // last: started after every member it uses exists
};

}  // namespace
}  // namespace drt::transfer

void register_transfer(py::module_& m) {
  using drt::transfer::ShmTransferEngine;
  using release_gil = py::call_guard<py::gil_scoped_release>;
  py::class_<ShmTransferEngine>(m, "ShmTransferEngine",
                                "Pulls block slices from peers' shm pools on a worker thread.")
      .def(py::init<int, double>(), "num_copy_threads"_a, "spin_us"_a)
      .def("open_region", &ShmTransferEngine::open_region, release_gil(),
           "Maps /dev/shm/<name> read-only (MAP_POPULATE); region id > 0, or -errno.", "name"_a,
           "nbytes"_a)
      .def("close_region", &ShmTransferEngine::close_region, "region"_a)
      .def("region_alive", &ShmTransferEngine::region_alive, "region"_a)
      .def("submit", &ShmTransferEngine::submit,
           "Checks and queues a batch; returns its transfer id. Pools are (num_blocks, "
           "num_layers, num_kv_heads, block_stride_bytes); slice is (src_layer_start, "
           "dst_layer_start, num_layers, src_head_start, dst_head_start, num_heads).",
           "region"_a, "src_offset"_a, "src_pool"_a, "dst"_a, "dst_pool"_a, "head_bytes"_a,
           "slice"_a, "block_mapping"_a, "num_pairs"_a)
      .def(
          "poll", [](ShmTransferEngine& e, int64_t id) { return e.registry().snapshot(id); },
          "(state, error, num_bytes, seconds)", "transfer"_a)
      .def(
          "wait",
          [](ShmTransferEngine& e, int64_t id, double timeout_s) {
            return e.registry().wait(id, timeout_s, e.wait_spin_s(id));
          },
          release_gil(), "Blocks until final or timeout; (state, error, num_bytes, seconds).",
          "transfer"_a, "timeout_s"_a)
      .def(
          "release", [](ShmTransferEngine& e, int64_t id) { e.registry().release(id); },
          "transfer"_a)
      .def("stats", [](ShmTransferEngine& e) { return e.registry().totals(); })
      .def("close", &ShmTransferEngine::close, release_gil());
}
