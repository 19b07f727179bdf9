// Division by a divisor fixed for a whole launch (the GQA group size, the block size), as a
// multiply-high, an add and a shift instead of nvcc's ~20-instruction inline 32-bit division
// or its ~80-instruction 64-bit subroutine (FlashInfer's uint_fastdiv, CUTLASS's FastDivmod;
// Granlund and Montgomery, PLDI'94). The launcher builds it on the host; kernels divide
// non-negative Int values. No CUDA headers, so that a plain C++ compiler builds it too
// (tests/kernels/test_fast_divmod.py checks it there).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define DRT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DRT_HOST_DEVICE inline
#endif

namespace drt::cuda {

// Int: int32_t (dividends in [0, 2^31)) or int64_t (dividends in [0, 2^63)).
template <typename Int>
struct FastDivmod {
  static_assert(std::is_same_v<Int, int32_t> || std::is_same_v<Int, int64_t>);
  using U = std::make_unsigned_t<Int>;
  static constexpr int kBits = 8 * sizeof(U);

  U divisor = 1;
  U multiplier = 1;  // floor(2^kBits * (2^shift - divisor) / divisor) + 1 (< 2^kBits)
  int shift = 0;     // ceil(log2(divisor))

  // divisor in [1, 2^31).
  static FastDivmod make(int64_t divisor) {
    // Twice U's width, for the multiplier's 2^kBits * ... product.
    using Wide = std::conditional_t<kBits == 32, uint64_t, unsigned __int128>;
    FastDivmod f;
    f.divisor = static_cast<U>(divisor);
    while ((Wide{1} << f.shift) < f.divisor) ++f.shift;
    f.multiplier =
        static_cast<U>((Wide{1} << kBits) * ((Wide{1} << f.shift) - f.divisor) / f.divisor + 1);
    return f;
  }

  DRT_HOST_DEVICE Int div(Int n) const {
    const U un = static_cast<U>(n);
    // hi < n, so hi + n < 2^kBits for the non-negative Int dividends: the add cannot wrap.
    return static_cast<Int>((mul_hi(un, multiplier) + un) >> shift);
  }

  // n % divisor, given q = div(n).
  DRT_HOST_DEVICE Int mod(Int n, Int q) const { return n - q * static_cast<Int>(divisor); }

 private:
  DRT_HOST_DEVICE static U mul_hi(U a, U b) {
#if defined(__CUDA_ARCH__)
    if constexpr (kBits == 32) {
      return __umulhi(a, b);
    } else {
      return __umul64hi(a, b);
    }
#else
    using Wide = std::conditional_t<kBits == 32, uint64_t, unsigned __int128>;
    return static_cast<U>((Wide{a} * b) >> kBits);
#endif
  }
};

}  // namespace drt::cuda

#undef DRT_HOST_DEVICE
