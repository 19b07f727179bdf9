// Guarded buffers of the emulator: every global test buffer, every __shared__ buffer and
// every fiber stack sits against an inaccessible page, so the first byte read or written
// out of bounds faults at once (FaultTrap carries the fault out of the signal handler to
// the scheduler, which raises an error naming the buffer). Global and shared buffers end
// at the guard page; stacks grow down onto theirs.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <new>
#include <string>

#include "emu_internal.h"

namespace drt_emu {
namespace {

struct Mapping {
  char* base;         // the mmap
  size_t map_bytes;   // including the guard page
  char* user;         // what the caller got
  size_t user_bytes;  // requested size
  RegionKind kind;
};

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// Keyed by the user pointer. Read after a fault has been carried out of the signal handler
// (scheduler.cpp), never inside it.
std::map<const char*, Mapping>& mappings() {
  static std::map<const char*, Mapping> m;
  return m;
}

const char* kind_name(RegionKind kind) {
  switch (kind) {
    case RegionKind::kGlobal:
      return "global";
    case RegionKind::kShared:
      return "shared";
    case RegionKind::kStack:
      return "thread stack";
  }
  return "?";
}

sigjmp_buf g_fault_env;
void* volatile g_fault_addr = nullptr;

void on_fault(int, siginfo_t* info, void*) {
  g_fault_addr = info->si_addr;
  siglongjmp(g_fault_env, 1);
}

}  // namespace

FaultTrap::FaultTrap() {
  static char alt_stack[64 << 10];
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, &old_stack_);
  struct sigaction sa{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv_);
  sigaction(SIGBUS, &sa, &old_bus_);
}

FaultTrap::~FaultTrap() {
  sigaction(SIGSEGV, &old_segv_, nullptr);
  sigaction(SIGBUS, &old_bus_, nullptr);
  sigaltstack(&old_stack_, nullptr);
}

sigjmp_buf& fault_env() { return g_fault_env; }
void* fault_address() { return g_fault_addr; }

void* guarded_alloc(size_t bytes, size_t align, RegionKind kind) {
  const size_t page = page_size();
  const size_t rounded = (bytes + align - 1) / align * align;
  const size_t data_pages = (rounded + page - 1) / page;
  const size_t map_bytes = (data_pages + 1) * page;
  void* base = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw std::bad_alloc();
  char* b = static_cast<char*>(base);
  Mapping m{b, map_bytes, nullptr, bytes, kind};
  if (kind == RegionKind::kStack) {
    mprotect(b, page, PROT_NONE);  // stacks grow down onto the guard
    m.user = b + page;
  } else {
    mprotect(b + data_pages * page, page, PROT_NONE);
    m.user = b + data_pages * page - rounded;
  }
  mappings()[m.user] = m;
  return m.user;
}

void guarded_free(void* ptr) {
  auto it = mappings().find(static_cast<const char*>(ptr));
  if (it == mappings().end()) return;
  munmap(it->second.base, it->second.map_bytes);
  mappings().erase(it);
}

std::string describe_address(const void* addr) {
  const char* a = static_cast<const char*>(addr);
  char buf[256];
  for (const auto& [user, m] : mappings()) {
    if (a < m.base || a >= m.base + m.map_bytes) continue;
    if (m.kind == RegionKind::kStack) {
      std::snprintf(buf, sizeof buf, "stack overflow of an emulated thread (address %p)", addr);
    } else if (a >= m.user) {
      std::snprintf(buf, sizeof buf,
                    "out-of-bounds access at %p: %td bytes past the end of a %zu-byte %s "
                    "buffer at %p",
                    addr, a - (m.user + m.user_bytes), m.user_bytes, kind_name(m.kind),
                    static_cast<const void*>(m.user));
    } else {
      std::snprintf(buf, sizeof buf, "invalid access at %p, before a %zu-byte %s buffer at %p",
                    addr, m.user_bytes, kind_name(m.kind), static_cast<const void*>(m.user));
    }
    return buf;
  }
  std::snprintf(buf, sizeof buf, "invalid memory access at %p", addr);
  return buf;
}

}  // namespace drt_emu
