// Warp collectives of the CUDA emulator: each lane leaves its operands on its own stack
// and suspends; once all 32 lanes are there the scheduler calls resolve_collective, which
// computes every lane's result as the PTX ISA defines it (shfl.sync, ldmatrix.x4(.trans),
// mma.sync.m16n8k16.row.col with f16/bf16 inputs and f32 accumulators).
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_internal.h"

namespace drt_emu {
namespace {

struct ShflOp {
  uint32_t mask;
  uint32_t value;
  int arg;
  int width;
  int mode;
  uint32_t result;
};

struct LdmatrixOp {
  const void* row;
  uint32_t* regs;
  int num;
  bool trans;
};

struct MmaOp {
  float* d;
  const uint32_t* a;
  uint32_t b[2];
  MmaType type;
};

void arrive(OpKind op, void* data, const char* file, int line) {
  EmuThread& t = current_thread();
  t.state = State::kCollective;
  t.op = op;
  t.op_data = data;
  t.file = file;
  t.line = line;
  suspend();
}

std::string lane_error(const EmuThread& t, const std::string& what) {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ") warp " + std::to_string(t.warp) + " lane " +
         std::to_string(t.lane) + ": " + what + " (" + site(t.file, t.line) + ")";
}

uint32_t full_mask(const std::vector<EmuThread*>& lanes) {
  return lanes.size() == 32 ? 0xffffffffu : (1u << lanes.size()) - 1u;
}

void resolve_shfl(std::vector<EmuThread*>& lanes) {
  const uint32_t all = full_mask(lanes);
  const auto* head = static_cast<const ShflOp*>(lanes[0]->op_data);
  for (EmuThread* t : lanes) {
    const auto* op = static_cast<const ShflOp*>(t->op_data);
    if (op->mask != all) {
      throw std::runtime_error(lane_error(*t, "shuffle mask " + std::to_string(op->mask) +
                                                  " does not name the whole warp (the emulator "
                                                  "runs full-warp shuffles only)"));
    }
    if (op->mode != head->mode || op->width != head->width || op->width < 1 || op->width > 32 ||
        (op->width & (op->width - 1)) != 0) {
      throw std::runtime_error(lane_error(*t,
                                          "shuffle width/mode differs between lanes or "
                                          "is not a power of two <= 32"));
    }
  }
  for (EmuThread* t : lanes) {
    auto* op = static_cast<ShflOp*>(t->op_data);
    const int lane = t->lane;
    const int seg = lane & ~(op->width - 1);
    int src = lane;
    switch (op->mode) {
      case kShflIdx:
        src = seg + (op->arg & (op->width - 1));
        break;
      case kShflUp:
        src = lane - op->arg >= seg ? lane - op->arg : lane;
        break;
      case kShflDown:
        src = lane + op->arg < seg + op->width ? lane + op->arg : lane;
        break;
      case kShflXor:
        src = lane ^ op->arg;
        if (src >= seg + op->width) src = lane;  // above the segment: own value
        break;
    }
    if (src < 0 || src >= static_cast<int>(lanes.size())) src = lane;
    op->result = static_cast<const ShflOp*>(lanes[src]->op_data)->value;
  }
}

uint16_t b16_at(const void* row, int elem) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * elem, 2);
  return v;
}

// ldmatrix.m8n8.xN.b16: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each);
// register i of lane l gets matrix i's row l/4, elements 2(l%4), 2(l%4)+1 (lower element in
// the lower half). .trans delivers the transposed matrix: elements (2(l%4), l/4) and
// (2(l%4)+1, l/4).
void resolve_ldmatrix(std::vector<EmuThread*>& lanes) {
  const auto* head = static_cast<const LdmatrixOp*>(lanes[0]->op_data);
  if (lanes.size() != 32) {
    throw std::runtime_error(lane_error(*lanes[0], "ldmatrix needs a full warp"));
  }
  for (EmuThread* t : lanes) {
    const auto* op = static_cast<const LdmatrixOp*>(t->op_data);
    if (op->num != head->num || op->trans != head->trans) {
      throw std::runtime_error(lane_error(*t, "ldmatrix shape differs between lanes"));
    }
    if (t->lane < 8 * op->num &&
        (reinterpret_cast<uintptr_t>(op->row) % 16 != 0 || !in_shared(op->row, 16))) {
      throw std::runtime_error(lane_error(*t,
                                          "ldmatrix row address is not 16-byte aligned "
                                          "shared memory"));
    }
  }
  for (EmuThread* t : lanes) {
    auto* op = static_cast<LdmatrixOp*>(t->op_data);
    const int l = t->lane;
    for (int m = 0; m < op->num; ++m) {
      uint16_t lo, hi;
      if (!op->trans) {
        const void* row = static_cast<const LdmatrixOp*>(lanes[8 * m + l / 4]->op_data)->row;
        lo = b16_at(row, 2 * (l % 4));
        hi = b16_at(row, 2 * (l % 4) + 1);
      } else {
        const void* r0 = static_cast<const LdmatrixOp*>(lanes[8 * m + 2 * (l % 4)]->op_data)->row;
        const void* r1 =
            static_cast<const LdmatrixOp*>(lanes[8 * m + 2 * (l % 4) + 1]->op_data)->row;
        lo = b16_at(r0, l / 4);
        hi = b16_at(r1, l / 4);
      }
      op->regs[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

float b16_to_float(uint16_t bits, MmaType type) {
  return type == MmaType::kF16 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

// Element `half` (0: low, 1: high) of a packed pair.
float elem(uint32_t reg, int half, MmaType type) {
  return b16_to_float(static_cast<uint16_t>(reg >> (16 * half)), type);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = lane / 4, q = lane % 4,
//   A (16x16): a0 = A[g][2q, 2q+1], a1 = A[g+8][2q, 2q+1], a2 = A[g][2q+8, +9], a3 = A[g+8][..]
//   B (16x8):  b0 = B[2q, 2q+1][g], b1 = B[2q+8, 2q+9][g]
//   C/D:       c0, c1 = C[g][2q, 2q+1], c2, c3 = C[g+8][2q, 2q+1]
// Products of 16-bit inputs are exact in fp32; the sum is formed in double and rounded once
// (the hardware's order differs, within the tests' tolerances).
void resolve_mma(std::vector<EmuThread*>& lanes) {
  if (lanes.size() != 32) throw std::runtime_error(lane_error(*lanes[0], "mma needs a full warp"));
  const MmaType type = static_cast<const MmaOp*>(lanes[0]->op_data)->type;
  float a[16][16], b[16][8], c[16][8];
  for (EmuThread* t : lanes) {
    const auto* op = static_cast<const MmaOp*>(t->op_data);
    if (op->type != type) throw std::runtime_error(lane_error(*t, "mma types differ"));
    const int g = t->lane / 4, q = t->lane % 4;
    for (int h = 0; h < 2; ++h) {
      a[g][2 * q + h] = elem(op->a[0], h, type);
      a[g + 8][2 * q + h] = elem(op->a[1], h, type);
      a[g][2 * q + 8 + h] = elem(op->a[2], h, type);
      a[g + 8][2 * q + 8 + h] = elem(op->a[3], h, type);
      b[2 * q + h][g] = elem(op->b[0], h, type);
      b[2 * q + 8 + h][g] = elem(op->b[1], h, type);
      c[g][2 * q + h] = op->d[h];
      c[g + 8][2 * q + h] = op->d[2 + h];
    }
  }
  for (EmuThread* t : lanes) {
    auto* op = static_cast<MmaOp*>(t->op_data);
    const int g = t->lane / 4, q = t->lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * q + (i % 2);
      double acc = c[row][col];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(a[row][k]) * b[k][col];
      op->d[i] = static_cast<float>(acc);
    }
  }
}

}  // namespace

void resolve_collective(std::vector<EmuThread*>& lanes) {
  switch (lanes[0]->op) {
    case OpKind::kShfl:
      return resolve_shfl(lanes);
    case OpKind::kLdmatrix:
      return resolve_ldmatrix(lanes);
    case OpKind::kMma:
      return resolve_mma(lanes);
    case OpKind::kSyncwarp:
      return;  // a barrier of the warp: nothing to compute once every lane is there
  }
}

uint32_t shfl(uint32_t mask, uint32_t value, int arg, int width, int mode, const char* file,
              int line) {
  ShflOp op{mask, value, arg, width, mode, 0};
  arrive(OpKind::kShfl, &op, file, line);
  return op.result;
}

void syncwarp(uint32_t mask, const char* file, int line) {
  if (mask != 0xffffffffu)
    fail("__syncwarp with a partial mask is not emulated (" + site(file, line) + ")");
  arrive(OpKind::kSyncwarp, nullptr, file, line);
}

void ldmatrix(uint32_t* regs, int num, bool trans, const void* row, const char* file, int line) {
  LdmatrixOp op{row, regs, num, trans};
  arrive(OpKind::kLdmatrix, &op, file, line);
}

void mma_m16n8k16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, MmaType type,
                  const char* file, int line) {
  MmaOp op{d, a, {b0, b1}, type};
  arrive(OpKind::kMma, &op, file, line);
}

}  // namespace drt_emu
