// Fibers of the emulated CUDA threads. Creating a context is writing a few words on a fresh
// stack; switching saves and restores the callee-saved registers only (x86-64 SysV), a
// dozen instructions. glibc's swapcontext also saves the signal mask with a sigprocmask
// system call per switch, which would cost more than the emulated work between switches.
#include <sys/mman.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "emu_internal.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

extern "C" void drt_emu_switch(void** from_sp, void* to_sp);

// Pushes rbp, rbx, r12-r15 on the current stack, saves rsp, loads the other stack and pops
// its registers; `ret` resumes it (or enters a new fiber's entry function).
asm(R"(
  .text
  .globl drt_emu_switch
  .hidden drt_emu_switch
  .type drt_emu_switch, @function
drt_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size drt_emu_switch, .-drt_emu_switch
)");

namespace drt_emu {

namespace {
// Kernel frames are small (fragments and accumulators in registers on a GPU); 64 KiB leaves
// room for the emulator's own calls. Overflow hits the guard page below the stack.
constexpr size_t kStackBytes = 64 << 10;
}  // namespace

void fiber_switch(void** from_sp, void* to_sp) { drt_emu_switch(from_sp, to_sp); }

void fiber_reset(Fiber& f, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(f.stack_lo + f.stack_bytes) & ~uintptr_t{15};
  auto* words = reinterpret_cast<uintptr_t*>(top);
  // entry() starts as if called: its return-address slot (never used) at top - 8, so the
  // stack is 16-byte aligned at the call; below it the address `ret` jumps to and the six
  // callee-saved registers drt_emu_switch pops.
  words[-1] = 0;
  words[-2] = reinterpret_cast<uintptr_t>(entry);
  for (int i = 3; i <= 8; ++i) words[-i] = 0;
  f.sp = &words[-8];
}

std::vector<Fiber>& fiber_pool(size_t count) {
  static std::vector<Fiber> pool;
  while (pool.size() < count) {
    Fiber f;
    f.stack_lo = static_cast<char*>(guarded_alloc(kStackBytes, 16, RegionKind::kStack));
    f.stack_bytes = kStackBytes;
    pool.push_back(f);
  }
  return pool;
}

}  // namespace drt_emu
