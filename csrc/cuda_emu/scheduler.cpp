// The CTA scheduler of the CUDA emulator: runs a grid one CTA at a time, each CUDA thread a
// fiber. A warp's lanes run until each blocks (at a warp collective, a __syncthreads or its
// exit); a collective is computed once every lane is at it, then the lanes continue. When
// every warp is blocked the CTA's barrier is checked and released. Warps go in the order
// set by set_warp_order (forward, reverse, or shuffled per barrier phase), so that code
// relying on one warp finishing before another gives different results between passes.
#include "scheduler.h"

#include <algorithm>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>

#include "emu_internal.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace drt_emu {
namespace {

constexpr size_t kMaxStaticSharedBytes = 48 << 10;    // CUDA's static __shared__ limit
constexpr size_t kMaxDynamicSharedBytes = 227 << 10;  // opt-in limit of sm_90 (H100/H200)

struct Launch {
  const char* kernel_name = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  Cta cta;
  EmuThread* current = nullptr;
  void* scheduler_sp = nullptr;
  std::string error;  // set by fail() inside a fiber
  char* dynamic_shared = nullptr;
  size_t dynamic_bytes = 0;
  std::map<std::pair<const char*, int>, SharedRegion> statics;
};

Launch* g_launch = nullptr;
WarpOrder g_order = WarpOrder::kForward;
uint64_t g_seed = 0;
uint64_t g_launch_count = 0;
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncSetAttribute

std::string dim_str(uint3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

std::string where(const Launch& l, const EmuThread* t) {
  std::string s = std::string(l.kernel_name) + " block " + dim_str(blockIdx);
  if (t != nullptr) s += " thread " + dim_str(t->idx);
  return s;
}

void fiber_entry() {
  Launch& l = *g_launch;
  l.body(l.ctx);
  l.current->state = State::kExited;
  fiber_switch(&l.current->fiber.sp, l.scheduler_sp);
  __builtin_trap();  // an exited fiber is never resumed
}

void resume(Launch& l, EmuThread& t) {
  l.current = &t;
  threadIdx = t.idx;
  fiber_switch(&l.scheduler_sp, t.fiber.sp);
  l.current = nullptr;
  if (t.state == State::kFailed) throw std::runtime_error(l.error);
}

// "threads 0-31, 64" for the linear ids of `ts`.
std::string thread_list(const std::vector<const EmuThread*>& ts) {
  std::string s;
  for (size_t i = 0; i < ts.size();) {
    size_t j = i;
    while (j + 1 < ts.size() && ts[j + 1]->linear == ts[j]->linear + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ts[i]->linear);
    if (j > i) s += "-" + std::to_string(ts[j]->linear);
    i = j + 1;
  }
  return s;
}

const char* state_name(const EmuThread& t) {
  switch (t.state) {
    case State::kBarrier:
      return "waits at __syncthreads";
    case State::kCollective:
      return "waits at a warp collective";
    case State::kExited:
      return "exited";
    default:
      return "runs";
  }
}

// Runs warp `w` until every lane is at the barrier or has exited, computing its
// collectives on the way.
void run_warp(Launch& l, int w) {
  auto& threads = l.cta.threads;
  const int first = w * 32;
  const int last = std::min<int>(first + 32, static_cast<int>(threads.size()));
  std::vector<EmuThread*> lanes;
  for (;;) {
    for (int i = first; i < last; ++i) {
      if (threads[i].state == State::kReady) resume(l, threads[i]);
    }
    lanes.clear();
    for (int i = first; i < last; ++i) {
      if (threads[i].state == State::kCollective) lanes.push_back(&threads[i]);
    }
    if (lanes.empty()) return;
    const EmuThread& head = *lanes.front();
    const std::string op_site = site(head.file, head.line);
    if (static_cast<int>(lanes.size()) != last - first) {
      for (int i = first; i < last; ++i) {
        if (threads[i].state != State::kCollective) {
          throw std::runtime_error(where(l, &threads[i]) + ": lane " +
                                   std::to_string(threads[i].lane) + " " + state_name(threads[i]) +
                                   " while lanes of its warp wait at "
                                   "the warp collective at " +
                                   op_site + " (every lane must reach it)");
        }
      }
    }
    for (EmuThread* t : lanes) {
      if (t->op != head.op || t->file != head.file || t->line != head.line) {
        throw std::runtime_error(where(l, t) + ": lanes of warp " + std::to_string(w) +
                                 " are at different warp collectives: lane 0 at " + op_site +
                                 ", lane " + std::to_string(t->lane) + " at " +
                                 site(t->file, t->line));
      }
    }
    resolve_collective(lanes);
    for (EmuThread* t : lanes) t->state = State::kReady;
  }
}

// Every warp is blocked: all live threads must wait at one __syncthreads.
// Returns false when every thread has exited (the CTA is done).
bool release_barrier(Launch& l) {
  std::vector<const EmuThread*> waiting, exited;
  for (const EmuThread& t : l.cta.threads) {
    (t.state == State::kExited ? exited : waiting).push_back(&t);
  }
  if (waiting.empty()) return false;
  const EmuThread& head = *waiting.front();
  if (!exited.empty()) {
    throw std::runtime_error(where(l, nullptr) + ": threads " + thread_list(waiting) +
                             " wait at __syncthreads (" + site(head.file, head.line) +
                             ") but thread(s) " + thread_list(exited) +
                             " exited without reaching it");
  }
  for (const EmuThread* t : waiting) {
    if (t->file != head.file || t->line != head.line) {
      std::vector<const EmuThread*> here, there;
      for (const EmuThread* u : waiting) {
        (u->file == head.file && u->line == head.line ? here : there).push_back(u);
      }
      throw std::runtime_error(where(l, nullptr) + ": divergent __syncthreads: threads " +
                               thread_list(here) + " at " + site(head.file, head.line) +
                               ", threads " + thread_list(there) + " at " + site(t->file, t->line));
    }
  }
  for (EmuThread& t : l.cta.threads) t.state = State::kReady;
  return true;
}

std::vector<int> warp_order(int num_warps, std::mt19937_64& rng) {
  std::vector<int> order(num_warps);
  std::iota(order.begin(), order.end(), 0);
  if (g_order == WarpOrder::kReverse) std::reverse(order.begin(), order.end());
  if (g_order == WarpOrder::kRandom) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

void run_cta(Launch& l, std::mt19937_64& rng) {
  for (auto& [key, region] : l.statics) std::memset(region.begin, 0xFF, region.bytes);
  if (l.dynamic_bytes > 0) std::memset(l.dynamic_shared, 0xFF, l.dynamic_bytes);
  for (EmuThread& t : l.cta.threads) {
    t.state = State::kReady;
    t.uncommitted.clear();
    t.groups.clear();
    fiber_reset(t.fiber, fiber_entry);
  }
  do {
    for (int w : warp_order(l.cta.num_warps, rng)) run_warp(l, w);
  } while (release_barrier(l));
}

void check_config(const char* name, const void* kernel, const LaunchConfig& c) {
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  auto bad = [&](const std::string& what) {
    throw std::runtime_error(std::string(name) + ": invalid launch: " + what);
  };
  if (threads == 0 || threads > 1024 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64) {
    bad("block " + dim_str({c.block.x, c.block.y, c.block.z}) + " (at most 1024 threads)");
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 2147483647u ||
      c.grid.y > 65535 || c.grid.z > 65535) {
    bad("grid " + dim_str({c.grid.x, c.grid.y, c.grid.z}));
  }
  const auto it = g_max_dynamic_shared.find(kernel);
  const size_t allowed = it == g_max_dynamic_shared.end() ? 48 << 10 : it->second;
  if (c.smem_bytes > allowed) {
    bad(std::to_string(c.smem_bytes) + " bytes of dynamic shared memory, more than the " +
        std::to_string(allowed) +
        " allowed (above 48 KiB needs cudaFuncAttributeMaxDynamicSharedMemorySize)");
  }
}

void run_all_ctas(Launch& l, const LaunchConfig& cfg) {
  std::mt19937_64 rng(g_seed * 1000003u + g_launch_count++);
  for (unsigned z = 0; z < cfg.grid.z; ++z) {
    for (unsigned y = 0; y < cfg.grid.y; ++y) {
      for (unsigned x = 0; x < cfg.grid.x; ++x) {
        blockIdx = {x, y, z};
        run_cta(l, rng);
      }
    }
  }
}

void release_launch(Launch& l) {
  for (auto& [key, region] : l.statics) guarded_free(region.begin);
  if (l.dynamic_shared != nullptr) guarded_free(l.dynamic_shared);
  g_launch = nullptr;
}

}  // namespace

void set_warp_order(WarpOrder order, uint64_t seed) {
  g_order = order;
  g_seed = seed;
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxDynamicSharedBytes) {
    return cudaErrorInvalidValue;
  }
  g_max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

void run_grid(const char* kernel_name, const void* kernel, const LaunchConfig& cfg,
              void (*body)(void*), void* ctx) {
  check_config(kernel_name, kernel, cfg);
  if (g_launch != nullptr) throw std::runtime_error("emulated launches cannot nest");
  Launch l;
  l.kernel_name = kernel_name;
  l.body = body;
  l.ctx = ctx;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  const int num_threads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  std::vector<Fiber>& fibers = fiber_pool(num_threads);
  l.cta.threads.resize(num_threads);
  l.cta.num_warps = (num_threads + 31) / 32;
  for (int i = 0; i < num_threads; ++i) {
    EmuThread& t = l.cta.threads[i];
    t.idx = {i % cfg.block.x, (i / cfg.block.x) % cfg.block.y, i / (cfg.block.x * cfg.block.y)};
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.fiber = fibers[i];
  }
  if (cfg.smem_bytes > 0) {
    l.dynamic_bytes = cfg.smem_bytes;
    l.dynamic_shared = static_cast<char*>(guarded_alloc(cfg.smem_bytes, 16, RegionKind::kShared));
    l.cta.shared.push_back({l.dynamic_shared, cfg.smem_bytes, nullptr, 0});
  }
  g_launch = &l;
  FaultTrap trap;
  if (sigsetjmp(fault_env(), 1) != 0) {
    // A fault: the fiber (or the collective being computed) is abandoned where it stood.
    const std::string msg = where(l, l.current) + ": " + describe_address(fault_address());
    release_launch(l);
    throw std::runtime_error(msg);
  }
  try {
    run_all_ctas(l, cfg);
  } catch (...) {
    release_launch(l);
    throw;
  }
  release_launch(l);
}

// ---- calls from inside emulated threads ------------------------------------------------------

EmuThread& current_thread() { return *g_launch->current; }
bool in_emulated_thread() { return g_launch != nullptr && g_launch->current != nullptr; }

void suspend() {
  Launch& l = *g_launch;
  fiber_switch(&l.current->fiber.sp, l.scheduler_sp);
}

void fail(const std::string& what) {
  Launch& l = *g_launch;
  l.error = where(l, l.current) + ": " + what;
  l.current->state = State::kFailed;
  suspend();
  __builtin_trap();
}

std::string site(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash != nullptr ? slash + 1 : file) + ":" + std::to_string(line);
}

bool in_shared(const void* ptr, size_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  for (const SharedRegion& r : g_launch->cta.shared) {
    if (p >= r.begin && p + bytes <= r.begin + r.bytes) return true;
  }
  return false;
}

void syncthreads(const char* file, int line) {
  EmuThread& t = current_thread();
  t.state = State::kBarrier;
  t.file = file;
  t.line = line;
  suspend();
}

void* shared_var(const char* file, int line, size_t bytes, size_t align) {
  Launch& l = *g_launch;
  auto [it, created] = l.statics.try_emplace({file, line});
  if (created) {
    size_t total = bytes;
    for (const auto& [key, r] : l.statics) total += r.bytes;
    if (total > kMaxStaticSharedBytes) {
      l.statics.erase(it);
      fail("static __shared__ memory exceeds 48 KiB at " + site(file, line));
    }
    char* p =
        static_cast<char*>(guarded_alloc(bytes, align < 16 ? 16 : align, RegionKind::kShared));
    std::memset(p, 0xFF, bytes);  // later CTAs are refilled by run_cta
    it->second = {p, bytes, file, line};
    l.cta.shared.push_back(it->second);
  }
  return it->second.begin;
}

void check_launch_bounds(unsigned max_threads, const char* file, int line) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if (threads > max_threads) {
    fail("launched with " + std::to_string(threads) + " threads per block, more than its " +
         "__launch_bounds__(" + std::to_string(max_threads) + ") at " + site(file, line) +
         " (on a GPU the launch fails)");
  }
}

void* dynamic_shared() { return g_launch->dynamic_shared; }

size_t shared_offset(const void* ptr, const char* file, int line) {
  const char* p = static_cast<const char*>(ptr);
  size_t base = 0;
  for (const SharedRegion& r : g_launch->cta.shared) {
    if (p >= r.begin && p < r.begin + r.bytes) return base + static_cast<size_t>(p - r.begin);
    base += (r.bytes + 15) / 16 * 16;
  }
  fail("address " + std::to_string(reinterpret_cast<uintptr_t>(ptr)) +
       " is not shared memory (converted to a shared address at " + site(file, line) + ")");
}

}  // namespace drt_emu
