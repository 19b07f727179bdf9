// Misaligned accesses fault on a GPU ("misaligned address": a uint4 load must be 16-byte
// aligned, a float load 4-byte) but pass silently on x86. The generated kernel sources are
// compiled with -fsanitize=alignment, and these handlers (instead of the sanitizer
// runtime, which is not linked) turn the compiler's check into the emulator's error: in an
// emulated thread it aborts the launch naming the thread, elsewhere it throws.
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "emu_internal.h"

namespace {

// The layouts GCC and Clang pass to the handlers (compiler-rt's ubsan_handlers.h).
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation loc;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};

[[noreturn]] void misaligned(const TypeMismatchData* d, uintptr_t pointer) {
  const uint64_t alignment = uint64_t{1} << d->log_alignment;
  char address[32];
  std::snprintf(address, sizeof address, "%#" PRIxPTR, pointer);
  std::string what = "misaligned address " + std::string(address) + " for a " +
                     std::to_string(alignment) + "-byte aligned " + d->type->name + " (" +
                     drt_emu::site(d->loc.file, static_cast<int>(d->loc.line)) + ")";
  if (drt_emu::in_emulated_thread()) drt_emu::fail(what);
  throw std::runtime_error(what);
}

}  // namespace

extern "C" {

__attribute__((visibility("hidden"), used)) void __ubsan_handle_type_mismatch_v1(
    TypeMismatchData* d, uintptr_t pointer) {
  misaligned(d, pointer);
}

__attribute__((visibility("hidden"), used)) void __ubsan_handle_type_mismatch_v1_abort(
    TypeMismatchData* d, uintptr_t pointer) {
  misaligned(d, pointer);
}

}  // extern "C"
