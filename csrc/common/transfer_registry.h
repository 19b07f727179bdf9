// Bookkeeping shared by the transfer engines: one record per submitted transfer (state,
// error message, bytes, submit and end times) and per-engine totals. Thread-safe: the copy
// worker (or the CUDA poller) moves records forward while Python threads poll or wait.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>

namespace drt::transfer {

// Polls `done()` for up to `spin_s` seconds, yielding the core between polls; returns
// done(). Thread hand-offs through a futex cost tens of microseconds in a VM, the whole
// budget of a small transfer. Yielding (not a pause loop) matters when the waiter and the
// thread it waits for share a core: a pure spin would hold the core for all of spin_s.
template <typename Pred>
inline bool spin_until(Pred done, double spin_s) {
  if (done()) return true;
  if (spin_s <= 0) return false;
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(spin_s));
  do {
    std::this_thread::yield();
    if (done()) return true;
  } while (std::chrono::steady_clock::now() < end);
  return false;
}

// Must match distserve_rt.transfer.base.TransferStatus.
enum class TransferState : int {
  kPending = 0,       // queued, nothing copied yet
  kTransferring = 1,  // copy in progress
  kSuccess = 2,       // every byte landed (final)
  kFailed = 3,        // nothing usable landed; see the message (final)
};

inline bool is_final(TransferState s) {
  return s == TransferState::kSuccess || s == TransferState::kFailed;
}

// What Python sees of one transfer: (state, error, num_bytes, seconds submit -> final or
// so far).
using TransferSnapshot = std::tuple<int, std::string, int64_t, double>;

// Engine totals: (num_submitted, num_succeeded, num_failed, num_in_flight, bytes_succeeded,
// seconds_succeeded summed over transfers).
using TransferTotals = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, double>;

class TransferRegistry {
 public:
  using Clock = std::chrono::steady_clock;

  int64_t add(int64_t num_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = next_id_++;
    records_.emplace(id, Record{TransferState::kPending, {}, num_bytes, Clock::now(), {}});
    ++num_submitted_;
    return id;
  }

  // Moves a transfer forward; a final state stamps the end time and updates the totals.
  void set_state(int64_t id, TransferState state, const std::string& error = {}) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = records_.find(id);
      if (it == records_.end() || is_final(it->second.state)) return;
      Record& r = it->second;
      r.state = state;
      r.error = error;
      if (is_final(state)) {
        r.end = Clock::now();
        if (state == TransferState::kSuccess) {
          ++num_succeeded_;
          bytes_succeeded_ += r.num_bytes;
          seconds_succeeded_ += seconds(r);
        } else {
          ++num_failed_;
        }
      }
    }
    if (is_final(state)) done_.notify_all();
  }

  TransferState state(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    return find(id).state;
  }

  TransferSnapshot snapshot(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    return to_snapshot(find(id));
  }

  // Blocks (the caller releases the GIL) until the transfer is final or timeout_s passed;
  // spins for the first min(spin_s, timeout_s) seconds before sleeping.
  TransferSnapshot wait(int64_t id, double timeout_s, double spin_s = 0.0) {
    spin_until([&] { return is_final(state(id)); }, std::min(spin_s, timeout_s));
    std::unique_lock<std::mutex> lock(mutex_);
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(timeout_s < 0 ? 0 : timeout_s));
    done_.wait_until(lock, deadline, [&] { return is_final(find(id).state); });
    return to_snapshot(find(id));
  }

  // Forgets a final transfer (its numbers stay in the totals). Unknown ids are an error.
  void release(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!is_final(find(id).state)) {
      throw std::invalid_argument("transfer " + std::to_string(id) +
                                  " is still in flight; release it after a final status");
    }
    records_.erase(id);
  }

  TransferTotals totals() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t in_flight = num_submitted_ - num_succeeded_ - num_failed_;
    return {num_submitted_, num_succeeded_,   num_failed_,
            in_flight,      bytes_succeeded_, seconds_succeeded_};
  }

 private:
  struct Record {
    TransferState state;
    std::string error;
    int64_t num_bytes;
    Clock::time_point submit;
    Clock::time_point end;
  };

  Record& find(int64_t id) {
    auto it = records_.find(id);
    if (it == records_.end()) {
      throw std::invalid_argument("unknown transfer id " + std::to_string(id) +
                                  " (never submitted to this engine, or already released)");
    }
    return it->second;
  }

  static double seconds(const Record& r) {
    const auto end = is_final(r.state) ? r.end : Clock::now();
    return std::chrono::duration<double>(end - r.submit).count();
  }

  static TransferSnapshot to_snapshot(const Record& r) {
    return {static_cast<int>(r.state), r.error, r.num_bytes, seconds(r)};
  }

  std::mutex mutex_;
  std::condition_variable done_;
  std::unordered_map<int64_t, Record> records_;
  int64_t next_id_ = 1;
  int64_t num_submitted_ = 0;
  int64_t num_succeeded_ = 0;
  int64_t num_failed_ = 0;
  int64_t bytes_succeeded_ = 0;
  double seconds_succeeded_ = 0.0;
};

}  // namespace drt::transfer
