// cp.async of the CUDA emulator: per-thread groups of 16-byte copies. The source is read at
// issue (a bad address faults on the issuing line), the destination reads as NaN (0xFF)
// until the cp.async.wait_group that retires its group copies the bytes in, so a missing
// wait, or a read of another thread's copy without the barrier after the wait, gives NaN.
#include <cstring>
#include <string>
#include <utility>

#include "emu_internal.h"

namespace drt_emu {

void cp_async(void* dst, const void* src, int src_bytes, int cp_bytes, const char* file, int line) {
  EmuThread& t = current_thread();
  const auto d = reinterpret_cast<uintptr_t>(dst);
  const auto s = reinterpret_cast<uintptr_t>(src);
  if (d % cp_bytes != 0 || !in_shared(dst, cp_bytes)) {
    fail("cp.async destination " + std::to_string(d) + " is not " + std::to_string(cp_bytes) +
         " aligned shared memory (" + site(file, line) + ")");
  }
  if (src_bytes > 0 && s % cp_bytes != 0) {
    fail("cp.async source " + std::to_string(s) + " is not " + std::to_string(cp_bytes) +
         "-byte aligned (" + site(file, line) + ")");
  }
  PendingCopy c{dst, cp_bytes, {}};
  // The source is read now (a bad address faults at the issuing line); the bytes land at
  // the wait that retires the group, and until then the destination reads as NaN.
  std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
  std::memset(dst, 0xFF, static_cast<size_t>(cp_bytes));
  t.uncommitted.push_back(c);
}

void cp_async_commit() {
  EmuThread& t = current_thread();
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait(int pending, const char*, int) {
  EmuThread& t = current_thread();
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const PendingCopy& c : t.groups.front()) std::memcpy(c.dst, c.data, c.bytes);
    t.groups.pop_front();
  }
}

}  // namespace drt_emu
