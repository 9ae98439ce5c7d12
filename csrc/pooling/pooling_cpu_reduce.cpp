// The forward segment reduce on the CPU, built once per instruction set (CMake
// compiles this file with TOKCORE_CPU_ISA_NAMESPACE = isa_base and, on x86-64,
// isa_avx2 (-mavx2 -mfma) and isa_avx512 (x86-64-v4)); pooling_cpu.cpp picks
// one at run time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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
// (SSE2, the x86-64 baseline), 32 bytes (AVX2) or 64 bytes (AVX-512). The
// compiler does not keep a scalar accumulator array in registers across the row
// loop; these do, and run 2x faster (measured 17 vs 9 GB/s on one core for f32
// mean, D = 256, SSE2).
// Sums are formed in the same order as the scalar path: the results are
// bitwise the same in every variant.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float f32xN __attribute__((vector_size(kVecBytes)));
typedef double f64xN __attribute__((vector_size(kVecBytes)));
typedef uint32_t u32xN __attribute__((vector_size(kVecBytes)));

inline f32xN as_f32(u32xN w) { f32xN v; std::memcpy(&v, &w, sizeof v); return v; }
inline u32xN as_u32(f32xN v) { u32xN w; std::memcpy(&w, &v, sizeof w); return w; }

// float_to_bf16 (round to nearest even, NaN kept quiet) on every lane; the bf16
// bits come back in the low 16 bits of each 32-bit lane.
inline u32xN bf16_bits(f32xN v) {
  const u32xN u = as_u32(v);
  const u32xN rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  const u32xN quiet_nan = (u >> 16) | 0x40u;
  return ((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded;
}

// Lanes<T>: how one load of T features is accumulated. N features per load;
// Acc::add accumulates a load of a row, Acc::store writes the N results.
template <typename T> struct Lanes;
// float and double: the features are the accumulator's own type, loaded as is.
template <typename T, typename VecT>
struct NativeLanes {
  static constexpr int N = kVecBytes / int(sizeof(T));
  struct Acc {
    VecT v = {};
    void add(const T* p) { VecT x; std::memcpy(&x, p, sizeof x); v += x; }
    void store(T* p, T divisor) const { const VecT r = v / divisor; std::memcpy(p, &r, sizeof r); }
  };
};
template <> struct Lanes<float> : NativeLanes<float, f32xN> {};
template <> struct Lanes<double> : NativeLanes<double, f64xN> {};
// bf16: a 32-bit lane holds two neighbours; the even one is its low half shifted
// up, the odd one its high half masked: one load, a shift and a mask per 2N
// features, and no shuffles, since the results are interleaved back the same way.
template <> struct Lanes<bf16_t> {
  static constexpr int N = kVecBytes / 2;
  struct Acc {
    f32xN even = {}, odd = {};
    void add(const bf16_t* p) {
      u32xN w;
      std::memcpy(&w, p, sizeof w);
      even += as_f32(w << 16);
      odd += as_f32(w & 0xffff0000u);
    }
    void store(bf16_t* p, float divisor) const {
      const u32xN packed = bf16_bits(even / divisor) | (bf16_bits(odd / divisor) << 16);
      std::memcpy(p, &packed, sizeof packed);
    }
  };
};
// f16: the AVX2 and AVX-512 builds convert a whole vector at a time with F16C
// (exact widening; narrowing rounds to nearest even, as float_to_f16 does, so
// the results match the baseline bitwise); the baseline converts lane by lane.
#if defined(__AVX512F__) || defined(__AVX2__)
template <> struct Lanes<f16_t> {
  static constexpr int N = kVecBytes / 4;  // one load of N halves fills one float vector
  struct Acc {
    f32xN v = {};
    void add(const f16_t* p) {
#if defined(__AVX512F__)
      __m256i h;
      std::memcpy(&h, p, sizeof h);
      const __m512 f = _mm512_cvtph_ps(h);
#else
      __m128i h;
      std::memcpy(&h, p, sizeof h);
      const __m256 f = _mm256_cvtph_ps(h);
#endif
      f32xN x;
      std::memcpy(&x, &f, sizeof x);
      v += x;
    }
    void store(f16_t* p, float divisor) const {
      const f32xN r = v / divisor;
      constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(__AVX512F__)
      __m512 f;
      std::memcpy(&f, &r, sizeof f);
      const __m256i h = _mm512_cvtps_ph(f, kRound);
#else
      __m256 f;
      std::memcpy(&f, &r, sizeof f);
      const __m128i h = _mm256_cvtps_ph(f, kRound);
#endif
      std::memcpy(p, &h, sizeof h);
    }
  };
};
#else
template <> struct Lanes<f16_t> {  // no f16 conversion in the baseline ISA: lane by lane
  static constexpr int N = kVecBytes / 4;
  struct Acc {
    f32xN v = {};
    void add(const f16_t* p) {
      for (int j = 0; j < N; ++j) v[j] += f16_to_float(p[j]);
    }
    void store(f16_t* p, float divisor) const {
      for (int j = 0; j < N; ++j) p[j] = float_to_f16(v[j] / divisor);
    }
  };
};
#endif

// Sums rows [begin, end) of features [d0, d0 + kLoads * N) for as many whole
// tiles as fit, advancing d0. The row loop is short (a word has a few bytes), so
// each accumulator's add chain is latency-bound; a wide tile keeps 16 chains in
// flight and, for D * sizeof(T) up to 16 vectors, covers the whole row, so each
// segment is read once, front to back. Measured on one core (Zen 5, D = 256,
// make cpp-bench) against 8 chains: AVX-512 bf16 19.5 -> 35.3 GB/s, f32 37.7 ->
// 41.1; AVX2 bf16 13.9 -> 17.9, f32 28.8 -> 31.3; SSE2 bf16 11.2 -> 16.4, f32 the
// same (17), despite the register spills that 16 chains cost there.
template <typename T, int kLoads>
inline void sum_tiles(const T* x, int64_t D, RowRange rows, acc_t<T> divisor, int64_t& d0, T* out) {
  using L = Lanes<T>;
  for (; d0 + kLoads * L::N <= D; d0 += kLoads * L::N) {
    typename L::Acc acc[kLoads];
    for (int64_t t = rows.begin; t < rows.end; ++t) {
      const T* row = x + t * D + d0;
      for (int k = 0; k < kLoads; ++k) acc[k].add(row + k * L::N);
    }
    for (int k = 0; k < kLoads; ++k) acc[k].store(out + d0 + k * L::N, divisor);
  }
}

template <typename T, Reduce R>
void reduce_rows(const Runtime& rt, const T* x, const int64_t* offsets, int64_t S, int64_t T_,
                 int64_t D, T* y) {
  using A = acc_t<T>;
  // Loads per wide tile: 16 accumulator vectors (bf16 fills two per load).
  constexpr int kWideLoads = std::is_same_v<T, bf16_t> ? 8 : 16;
  constexpr bool kSumLike = R == Reduce::kSum || R == Reduce::kMean;
  parallel_for(rt, 0, S, segment_grain(S, T_, D), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const RowRange rows = segment_rows(offsets, s, T_);
      const int64_t count = rows.end - rows.begin;
      T* out = y + s * D;
      int64_t d0 = 0;
      if (kSumLike) {
        const A divisor = (R == Reduce::kMean && count > 0) ? A(count) : A(1);
        sum_tiles<T, kWideLoads>(x, D, rows, divisor, d0, out);
        sum_tiles<T, 4>(x, D, rows, divisor, d0, out);  // what is left of whole vectors:
        sum_tiles<T, 1>(x, D, rows, divisor, d0, out);  // 4 chains, then 1
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
