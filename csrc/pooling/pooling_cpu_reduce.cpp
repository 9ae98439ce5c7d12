// The forward segment reduce on the CPU, built once per instruction set (CMake
// compiles this file with TOKCORE_CPU_ISA_NAMESPACE = isa_base and, on x86-64,
// isa_avx2 with -mavx2 -mfma); pooling_cpu.cpp picks one at run time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pooling_kernels.h"

#ifndef TOKCORE_CPU_ISA_NAMESPACE
#define TOKCORE_CPU_ISA_NAMESPACE isa_base
#endif

namespace tokcore {
namespace pooling {
namespace TOKCORE_CPU_ISA_NAMESPACE {
namespace {

// Reduces rows [begin, end) of features [d0, d0 + W): the generic path (max/min,
// and the last D % width features of sum/mean).
template <typename T, Reduce R, int W>
inline void reduce_tile(const T* x, int64_t D, int64_t begin, int64_t end, int64_t d0, T* out) {
  using A = acc_t<T>;
  A acc[W];
  for (int j = 0; j < W; ++j) acc[j] = reduce_identity<R, A>();
  for (int64_t t = begin; t < end; ++t) {
    const T* row = x + t * D + d0;
    for (int j = 0; j < W; ++j) acc[j] = reduce_combine<R, A>(acc[j], to_acc(row[j]));
  }
  for (int j = 0; j < W; ++j) out[d0 + j] = from_acc<T>(reduce_finalize<R, A>(acc[j], end - begin));
}

// Accumulator vectors (GCC/Clang vector extensions) of the build's width: 16 bytes
// (SSE2, the x86-64 baseline) or 32 bytes (AVX2). The compiler does not keep a
// scalar accumulator array in registers across the row loop; these do, and
// run 2x faster (measured 17 vs 9 GB/s on one core for f32 mean, D = 256, SSE2).
// Sums are formed in the same order as the scalar path: the results are
// bitwise the same in every variant.
#if defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float f32xN __attribute__((vector_size(kVecBytes)));
typedef double f64xN __attribute__((vector_size(kVecBytes)));
typedef uint16_t u16xN __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t u32xN __attribute__((vector_size(kVecBytes)));

template <typename T> struct Lanes;
template <> struct Lanes<float> {
  using V = f32xN;
  static constexpr int N = kVecBytes / 4;
  static V load(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
};
template <> struct Lanes<double> {
  using V = f64xN;
  static constexpr int N = kVecBytes / 8;
  static V load(const double* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(double* p, V v) { std::memcpy(p, &v, sizeof v); }
};
template <> struct Lanes<bf16_t> {
  using V = f32xN;
  static constexpr int N = kVecBytes / 4;
  static V load(const bf16_t* p) {  // bf16 is the top half of a float
    u16xN h;
    std::memcpy(&h, p, sizeof h);
    const u32xN w = __builtin_convertvector(h, u32xN) << 16;
    V v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
  static void store(bf16_t* p, V v) {  // float_to_bf16 (round to nearest even) on every lane
    u32xN u;
    std::memcpy(&u, &v, sizeof u);
    const u32xN rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
    const u32xN quiet_nan = (u >> 16) | 0x40u;
    const u32xN bits = ((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded;
    const u16xN h = __builtin_convertvector(bits, u16xN);
    std::memcpy(p, &h, sizeof h);
  }
};
template <> struct Lanes<f16_t> {  // no f16 conversion in the baseline ISA: lane by lane
  using V = f32xN;
  static constexpr int N = kVecBytes / 4;
  static V load(const f16_t* p) {
    V v;
    for (int j = 0; j < N; ++j) v[j] = f16_to_float(p[j]);
    return v;
  }
  static void store(f16_t* p, V v) {
    for (int j = 0; j < N; ++j) p[j] = float_to_f16(v[j]);
  }
};

template <typename T, Reduce R>
void reduce_rows(const Runtime& rt, const T* x, const int64_t* offsets, int64_t S, int64_t T_,
                 int64_t D, T* y) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  constexpr int kVecs = 128 / kVecBytes;  // 128 bytes of accumulators: 32 floats
  constexpr int kWidth = kVecs * L::N;
  constexpr bool kSumLike = R == Reduce::kSum || R == Reduce::kMean;
  parallel_for(rt, 0, S, segment_grain(S, T_, D), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const RowRange rows = segment_rows(offsets, s, T_);
      const int64_t count = rows.end - rows.begin;
      T* out = y + s * D;
      int64_t d0 = 0;
      if (kSumLike) {
        const A divisor = (R == Reduce::kMean && count > 0) ? A(count) : A(1);
        for (; d0 + kWidth <= D; d0 += kWidth) {
          typename L::V acc[kVecs] = {};
          for (int64_t t = rows.begin; t < rows.end; ++t) {
            const T* row = x + t * D + d0;
            for (int k = 0; k < kVecs; ++k) acc[k] += L::load(row + k * L::N);
          }
          for (int k = 0; k < kVecs; ++k) L::store(out + d0 + k * L::N, acc[k] / divisor);
        }
      } else {
        for (; d0 + 32 <= D; d0 += 32) reduce_tile<T, R, 32>(x, D, rows.begin, rows.end, d0, out);
      }
      for (; d0 < D; ++d0) reduce_tile<T, R, 1>(x, D, rows.begin, rows.end, d0, out);
    }
  });
}

}  // namespace

void segment_reduce_cpu(const Runtime& rt, DType dtype, const void* x, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, Reduce reduce, void* y) {
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    dispatch_reduce(reduce, [&](auto r) {
      reduce_rows<V, decltype(r)::value>(rt, static_cast<const V*>(x), offsets, S, T, D,
                                         static_cast<V*>(y));
    });
  });
}

}  // namespace TOKCORE_CPU_ISA_NAMESPACE
}  // namespace pooling
}  // namespace tokcore
