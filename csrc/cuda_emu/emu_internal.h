// Internal state of the CUDA emulator shared by its parts: fibers (fiber.cpp), guarded
// memory (memory.cpp), the CTA scheduler with barriers, shared memory and the fault trap
// (scheduler.cpp), cp.async (cp_async.cpp) and the warp collectives (warp_ops.cpp).
#pragma once

#include <cuda_runtime.h>

#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace drt_emu {

// ---- fibers -------------------------------------------------------------------------------
struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended
  char* stack_lo = nullptr;
  size_t stack_bytes = 0;
};
// Prepares `f` to run entry() on its own stack at the next switch_to.
void fiber_reset(Fiber& f, void (*entry)());
// Saves the current context in *from_sp and resumes the one saved in to_sp.
void fiber_switch(void** from_sp, void* to_sp);
// Stacks of `count` fibers (reused across launches; each ends at a guard page below it).
std::vector<Fiber>& fiber_pool(size_t count);

// ---- guarded memory -------------------------------------------------------------------------
enum class RegionKind { kGlobal, kShared, kStack };
// `bytes` (rounded up to `align`) ending exactly at an inaccessible page.
void* guarded_alloc(size_t bytes, size_t align, RegionKind kind);
void guarded_free(void* ptr);
// What a faulting address is (e.g. "12 bytes past the end of a 4096-byte global buffer").
std::string describe_address(const void* addr);

// Installs the fault handler for one launch (on its own stack: the fault may be a fiber's
// stack overflow) and puts back whatever was there (e.g. Python's faulthandler) after. A
// SIGSEGV/SIGBUS then siglongjmps to fault_env() with the address in fault_address().
class FaultTrap {
 public:
  FaultTrap();
  ~FaultTrap();
  FaultTrap(const FaultTrap&) = delete;
  FaultTrap& operator=(const FaultTrap&) = delete;

 private:
  stack_t old_stack_{};
  struct sigaction old_segv_{};
  struct sigaction old_bus_{};
};
sigjmp_buf& fault_env();
void* fault_address();

// ---- threads and the running CTA ------------------------------------------------------------
enum class State { kReady, kBarrier, kCollective, kExited, kFailed };
enum class OpKind { kShfl, kLdmatrix, kMma, kSyncwarp };

struct PendingCopy {
  void* dst;
  int bytes;
  alignas(16) unsigned char data[16];
};

struct EmuThread {
  uint3 idx;
  int linear;
  int warp;
  int lane;
  State state;
  const char* file;  // where it waits (barrier or collective)
  int line;
  OpKind op;
  void* op_data;  // the lane's operands and results, on its own stack
  Fiber fiber;
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct SharedRegion {
  char* begin;
  size_t bytes;
  const char* file;  // declaration site (null: dynamic shared memory)
  int line;
};

struct Cta {
  std::vector<EmuThread> threads;
  std::vector<SharedRegion> shared;  // every __shared__ buffer of this launch
  int num_warps = 0;
};

EmuThread& current_thread();
bool in_emulated_thread();
// Suspends the calling emulated thread (its state already says why) until resumed.
void suspend();
// Aborts the launch from inside an emulated thread: the scheduler raises `what`, prefixed
// with the kernel, CTA and thread.
[[noreturn]] void fail(const std::string& what);
std::string site(const char* file, int line);
bool in_shared(const void* ptr, size_t bytes);

// Computes the results of a warp collective whose lanes (all of them) have arrived.
void resolve_collective(std::vector<EmuThread*>& lanes);

}  // namespace drt_emu
