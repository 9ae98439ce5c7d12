// The arithmetic-bound CPU kernels of the segment ops, built once per
// instruction set: the forward and backward reduce (CMake compiles
// this file with TOKCORE_CPU_ISA_NAMESPACE = isa_base and, on x86-64, isa_avx2
// (AVX2, FMA, F16C) and isa_avx512 (x86-64-v4)); pooling_cpu.cpp picks one at
// run time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pooling_cpu_segments.h"
#include "pooling_kernels.h"
#include "tokcore/common/streaming_stores.h"

#ifndef TOKCORE_CPU_ISA_NAMESPACE
#define TOKCORE_CPU_ISA_NAMESPACE isa_base
#endif

namespace tokcore {
namespace pooling {
namespace TOKCORE_CPU_ISA_NAMESPACE {
namespace {

// Reduces rows [begin, end) of features [d0, d0 + W) with scalar code, in the
// reduce's blocks (kReduceBlockRows): the last D % N features, where no whole
// vector fits.
template <typename T, Reduce R, int W>
inline void reduce_tile(const T* x, int64_t D, int64_t begin, int64_t end, int64_t d0, T* out) {
  using A = acc_t<T>;
  A total[W];
  for (int j = 0; j < W; ++j) total[j] = reduce_identity<R, A>();
  const RowRange rows{begin, end};
  for (int64_t k = 0; k < reduce_block_count(rows); ++k) {
    const RowRange block = reduce_block_rows(rows, k);
    A acc[W];
    for (int j = 0; j < W; ++j) acc[j] = reduce_identity<R, A>();
    for (int64_t t = block.begin; t < block.end; ++t) {
      const T* row = x + t * D + d0;
      for (int j = 0; j < W; ++j) acc[j] = reduce_combine<R, A>(acc[j], to_acc(row[j]));
    }
    for (int j = 0; j < W; ++j) total[j] = reduce_combine<R, A>(total[j], acc[j]);
  }
  for (int j = 0; j < W; ++j) out[d0 + j] = from_acc<T>(reduce_finalize<R, A>(total[j], end - begin));
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
typedef uint16_t u16xHalf __attribute__((vector_size(kVecBytes / 2)));  // the f16 of one f32xN

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

// Lanes<T>: how one load of N features of T becomes K accumulator vectors (V, of
// acc_t<T> lanes) and how K vectors go back to N features. Every conversion is
// exact or rounds as the scalar from_acc<T> does, so each variant gives the
// scalar path's bits. select keeps the raw bits of N features where K masks
// (comparisons of V vectors) say true, and zeroes the rest.
template <typename T> struct Lanes;
// float and double: the features are the accumulator's own type, loaded as is.
template <typename T, typename VecT>
struct NativeLanes {
  using V = VecT;
  static constexpr int N = kVecBytes / int(sizeof(T)), K = 1;
  static void load(const T* p, V* v) {
    V x;
    std::memcpy(&x, p, sizeof x);
    v[0] = x;
  }
  template <bool kStream>
  static void store(T* p, const V* v) {
    const V r = v[0];  // (a copy: memcpy straight from v compiles to scalar moves)
    store_vector<kStream, sizeof r>(p, &r);
  }
  template <bool kStream, typename M>
  static void select(const T* p, const M* take, T* out) {
    M bits;
    std::memcpy(&bits, p, sizeof bits);
    bits &= take[0];
    store_vector<kStream, sizeof bits>(out, &bits);
  }
};
template <> struct Lanes<float> : NativeLanes<float, f32xN> {};
template <> struct Lanes<double> : NativeLanes<double, f64xN> {};
// bf16: a 32-bit lane holds two neighbours; the even one is its low half shifted
// up, the odd one its high half masked: one load, a shift and a mask per 2
// vectors, and no shuffles, since the results are interleaved back the same way.
template <> struct Lanes<bf16_t> {
  using V = f32xN;
  static constexpr int N = kVecBytes / 2, K = 2;
  static void load(const bf16_t* p, V* v) {
    u32xN w;
    std::memcpy(&w, p, sizeof w);
    v[0] = as_f32(w << 16);
    v[1] = as_f32(w & 0xffff0000u);
  }
  template <bool kStream>
  static void store(bf16_t* p, const V* v) {
    const u32xN packed = bf16_bits(v[0]) | (bf16_bits(v[1]) << 16);
    store_vector<kStream, sizeof packed>(p, &packed);
  }
  template <bool kStream, typename M>
  static void select(const bf16_t* p, const M* take, bf16_t* out) {
    u32xN w, even, odd;  // take[0] for the low halves, take[1] for the high ones
    std::memcpy(&w, p, sizeof w);
    std::memcpy(&even, &take[0], sizeof even);
    std::memcpy(&odd, &take[1], sizeof odd);
    w &= (even & 0xffffu) | (odd & 0xffff0000u);
    store_vector<kStream, sizeof w>(out, &w);
  }
};
// Lanes<f16_t>::select in both builds: N halves, whose 32-bit masks narrow to 16 bits.
template <bool kStream, typename M>
inline void select_halves(const f16_t* p, const M& take, f16_t* out) {
  u16xHalf h;
  std::memcpy(&h, p, sizeof h);
  h &= __builtin_convertvector(take, u16xHalf);
  store_vector<kStream, sizeof h>(out, &h);
}
// f16: the AVX2 and AVX-512 builds convert a whole vector at a time with F16C
// (exact widening; narrowing rounds to nearest even as float_to_f16 does, and
// NaN is made canonical first, as float_to_f16 makes it); the baseline converts
// lane by lane.
#if defined(__AVX512F__) || defined(__AVX2__)
// Every NaN lane made the quiet NaN of its sign, as float_to_f16 makes it.
inline f32xN canonical_nans(f32xN v) {
  return (v != v) ? as_f32((as_u32(v) & 0x80000000u) | 0x7fc00000u) : v;
}
template <> struct Lanes<f16_t> {
  using V = f32xN;
  static constexpr int N = kVecBytes / 4, K = 1;  // N halves fill one float vector
  static void load(const f16_t* p, V* v) {
#if defined(__AVX512F__)
    __m256i h;
    std::memcpy(&h, p, sizeof h);
    const __m512 f = _mm512_cvtph_ps(h);
#else
    __m128i h;
    std::memcpy(&h, p, sizeof h);
    const __m256 f = _mm256_cvtph_ps(h);
#endif
    std::memcpy(v, &f, sizeof f);
  }
  template <bool kStream>
  static void store(f16_t* p, const V* v) {
    const V r = canonical_nans(v[0]);
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
    store_vector<kStream, sizeof h>(p, &h);
  }
  template <bool kStream, typename M>
  static void select(const f16_t* p, const M* take, f16_t* out) { select_halves<kStream>(p, take[0], out); }
};
#else
template <> struct Lanes<f16_t> {  // no f16 conversion in the baseline ISA: lane by lane
  using V = f32xN;
  static constexpr int N = kVecBytes / 4, K = 1;
  static void load(const f16_t* p, V* v) {
    for (int j = 0; j < N; ++j) (*v)[j] = f16_to_float(p[j]);
  }
  template <bool kStream>  // (lane by lane: never streamed)
  static void store(f16_t* p, const V* v) {
    for (int j = 0; j < N; ++j) p[j] = float_to_f16((*v)[j]);
  }
  template <bool kStream, typename M>
  static void select(const f16_t* p, const M* take, f16_t* out) { select_halves<kStream>(p, take[0], out); }
};
#endif

// reduce_combine (tokcore/pooling/segment.h) on every lane: the same choices, so
// the same bits (max/min keep the first NaN, and the earlier value on ties).
template <Reduce R, typename V>
inline V combine(V acc, V x) {
  if constexpr (R == Reduce::kSum || R == Reduce::kMean) {
    return acc + x;
  } else {
    const auto better = R == Reduce::kMax ? (x > acc) : (x < acc);
    return (acc != acc) ? acc : ((x != x) ? x : (better ? x : acc));
  }
}

// attains (tokcore/pooling/segment.h) on every lane: v equals the result, or both
// are NaN. The mask of the lanes where it holds.
template <typename V>
inline auto attains_lanes(V v, V result) {
  return (v == result) | ((v != v) & (result != result));
}

// Reduces rows [begin, end) of features [d0, d0 + kLoads * N) for as many whole
// tiles as fit, advancing d0 (rows non-empty for max/min: see reduce_rows). The
// row loop is short (a word has a few bytes), so each accumulator's chain is
// latency-bound; a wide tile keeps 16 chains in flight and, for D * sizeof(T)
// up to 16 vectors, covers the whole row, so each segment is read once, front to
// back. Measured on one core (Zen 5, D = 256, make cpp-bench, mean) against 8
// chains: AVX-512 bf16 19.5 -> 35.3 GB/s, f32 37.7 -> 41.1; AVX2 bf16 13.9 ->
// 17.9, f32 28.8 -> 31.3; SSE2 bf16 11.2 -> 16.4, f32 the same (17), despite the
// register spills that 16 chains cost there. Software prefetch of each row 1-8 KB
// ahead (to start the next 4 KB page before the hardware prefetcher does) was tried
// on the 2-core VM (f32, T = 2^20, D = 256, calls alternating in one process): 4-15%
// slower while memory was fast (16.6 ms without), 8-13% faster while it was slow
// (30 ms without), so it is not used.
template <typename T, Reduce R, int kLoads, bool kStream>
inline void reduce_tiles(const T* x, int64_t D, RowRange rows, acc_t<T> divisor, int64_t& d0, T* out) {
  using L = Lanes<T>;
  using V = typename L::V;
  for (; d0 + kLoads * L::N <= D; d0 += kLoads * L::N) {
    V acc[kLoads][L::K];
    for (int k = 0; k < kLoads; ++k)
      for (int j = 0; j < L::K; ++j) acc[k][j] = V{} + reduce_identity<R, acc_t<T>>();
    for (int64_t t = rows.begin; t < rows.end; ++t) {
      const T* row = x + t * D + d0;
      for (int k = 0; k < kLoads; ++k) {
        V v[L::K];
        L::load(row + k * L::N, v);
        for (int j = 0; j < L::K; ++j) acc[k][j] = combine<R>(acc[k][j], v[j]);
      }
    }
    for (int k = 0; k < kLoads; ++k) {
      V result[L::K];
      for (int j = 0; j < L::K; ++j) result[j] = R == Reduce::kMean ? acc[k][j] / divisor : acc[k][j];
      L::template store<kStream>(out + d0 + k * L::N, result);
    }
  }
}

// Combines each block's result (its rows reduced one by one from the identity)
// over features [d0, d0 + kLoads * N), for as many whole tiles as fit (advancing
// d0), into `totals`: one accumulator vector set per vector of features, in the
// Lanes layout (K vectors per N features). The row loop is reduce_tiles's, written
// twice on purpose: one always-inlined helper for both made the f32 word reduce 6%
// slower on one core (make cpp-bench, 38.2 against 35.6 GB/s, three runs each).
template <typename T, Reduce R, int kLoads>
inline void combine_block_tiles(const T* x, int64_t D, RowRange block, int64_t& d0,
                                typename Lanes<T>::V* totals) {
  using L = Lanes<T>;
  using V = typename L::V;
  for (; d0 + kLoads * L::N <= D; d0 += kLoads * L::N) {
    V acc[kLoads][L::K];
    for (int k = 0; k < kLoads; ++k)
      for (int j = 0; j < L::K; ++j) acc[k][j] = V{} + reduce_identity<R, acc_t<T>>();
    for (int64_t t = block.begin; t < block.end; ++t) {
      const T* row = x + t * D + d0;
      for (int k = 0; k < kLoads; ++k) {
        V v[L::K];
        L::load(row + k * L::N, v);
        for (int j = 0; j < L::K; ++j) acc[k][j] = combine<R>(acc[k][j], v[j]);
      }
    }
    V* total = totals + d0 / L::N * L::K;
    for (int k = 0; k < kLoads; ++k)
      for (int j = 0; j < L::K; ++j) total[k * L::K + j] = combine<R>(total[k * L::K + j], acc[k][j]);
  }
}

// Running totals of D features: vectors in the Lanes layout (K per N features),
// then the scalar tail past the last whole vector.
template <typename T, Reduce R>
struct FeatureTotals {
  using V = typename Lanes<T>::V;
  static int64_t vectors(int64_t D) { return D / Lanes<T>::N * Lanes<T>::K; }
  static int64_t tail(int64_t D) { return D - D / Lanes<T>::N * Lanes<T>::N; }
  // Sets `count` sets of totals (vectors(D) vectors and tail(D) scalars each) to the identity.
  static void reset(V* vec, acc_t<T>* tail_values, int64_t D, int64_t count) {
    std::fill(vec, vec + count * vectors(D), V{} + reduce_identity<R, acc_t<T>>());
    std::fill(tail_values, tail_values + count * tail(D), reduce_identity<R, acc_t<T>>());
  }
};

// Combines the result of rows `block` (reduced row by row from the identity) into
// vec and tail. Each row is read once across all features, with the same wide
// tiles as words.
template <typename T, Reduce R>
void combine_block(const T* x, int64_t D, RowRange block, typename Lanes<T>::V* vec, acc_t<T>* tail) {
  using A = acc_t<T>;
  constexpr int kWideLoads = 16 / Lanes<T>::K;
  const int64_t vec_end = D - FeatureTotals<T, R>::tail(D);
  int64_t d0 = 0;
  combine_block_tiles<T, R, kWideLoads>(x, D, block, d0, vec);
  combine_block_tiles<T, R, 4>(x, D, block, d0, vec);
  combine_block_tiles<T, R, 1>(x, D, block, d0, vec);
  for (int64_t d = vec_end; d < D; ++d) {
    A acc = reduce_identity<R, A>();
    for (int64_t t = block.begin; t < block.end; ++t) acc = reduce_combine<R, A>(acc, to_acc(x[t * D + d]));
    tail[d - vec_end] = reduce_combine<R, A>(tail[d - vec_end], acc);
  }
}

// The result of a segment of `count` (> 0) rows from its totals.
template <typename T, Reduce R, bool kStream>
void store_totals(const typename Lanes<T>::V* vec, const acc_t<T>* tail, int64_t D, int64_t count, T* out) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  const A divisor = A(count);
  const int64_t vec_end = D - FeatureTotals<T, R>::tail(D);
  for (int64_t d0 = 0; d0 < vec_end; d0 += L::N) {
    V result[L::K];
    for (int j = 0; j < L::K; ++j) {
      const V total = vec[d0 / L::N * L::K + j];
      result[j] = R == Reduce::kMean ? total / divisor : total;
    }
    L::template store<kStream>(out + d0, result);
  }
  for (int64_t d = vec_end; d < D; ++d) out[d] = from_acc<T>(reduce_finalize<R, A>(tail[d - vec_end], count));
}

// A sum or mean over more than kReduceBlockRows rows on one thread, in the
// reduce's blocks (tokcore/pooling/segment.h), as the CUDA kernels form it: each
// block's sums, row by row, added in block order to running totals kept in memory.
// Block by block, each block's rows are read once across all features. Reading
// one tile's columns down the whole segment, then the next tile's, took 13.9 ms
// for bf16 mean with 4096-row segments and 19.6 ms with 8 segments, against 11.3
// and 11.5 ms this way and 11.5 ms for 200-row ones (T = 2^20, D = 256, 2-core
// VM). Words never get here; max/min need no blocks on one thread: they come out
// the same either way.
template <typename T, Reduce R, bool kStream>
void reduce_long_segment(const T* x, int64_t D, RowRange rows, T* out) {
  static_assert(R == Reduce::kSum || R == Reduce::kMean, "max/min need no blocks");
  using Totals = FeatureTotals<T, R>;
  std::vector<typename Lanes<T>::V> vec(size_t(Totals::vectors(D)));
  std::vector<acc_t<T>> tail(size_t(Totals::tail(D)));
  Totals::reset(vec.data(), tail.data(), D, 1);
  for (int64_t k = 0; k < reduce_block_count(rows); ++k)
    combine_block<T, R>(x, D, reduce_block_rows(rows, k), vec.data(), tail.data());
  store_totals<T, R, kStream>(vec.data(), tail.data(), D, rows.end - rows.begin, out);
}

// The long segments `segments` (each of two blocks or more, in increasing order):
// the threads share out the blocks of all of them, each block's result goes to its
// own slot, and then each segment combines its blocks' results in order: the
// reduce's order of operations (segment.h), as on one thread, and the GPU's three
// passes on the CPU. One segment of 2^20 rows (D = 256) then runs on every thread
// instead of one: on the 2-core VM, where one core nearly saturates memory, bf16
// mean 13.3 -> 11.2 ms and f32 unchanged (27 ms); more so with more cores.
template <typename T, Reduce R, bool kStream>
void reduce_shared_blocks(const Runtime& rt, const T* x, const int64_t* offsets, int64_t T_, int64_t D,
                          std::vector<int64_t> segments, T* y) {
  using V = typename Lanes<T>::V;
  using Totals = FeatureTotals<T, R>;
  const auto rows_of = [&](int64_t s) { return segment_rows(offsets, s, T_); };
  const SegmentPieces blocks(std::move(segments), rows_of, kReduceBlockRows);  // a slot per block
  const int64_t nvec = Totals::vectors(D), ntail = Totals::tail(D);
  std::vector<V> vec(size_t(blocks.count() * nvec));
  std::vector<acc_t<T>> tail(size_t(blocks.count() * ntail));
  parallel_for(rt, 0, blocks.count(), 1, [&](int64_t q0, int64_t q1) {
    Totals::reset(vec.data() + q0 * nvec, tail.data() + q0 * ntail, D, q1 - q0);
    blocks.for_each(q0, q1, rows_of, [&](int64_t, const SegmentPieces::Piece& block) {
      combine_block<T, R>(x, D, block.rows, vec.data() + block.number * nvec, tail.data() + block.number * ntail);
    });
  });
  parallel_for(rt, 0, int64_t(blocks.segments.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<V> total_vec(static_cast<size_t>(nvec));
    std::vector<acc_t<T>> total_tail(static_cast<size_t>(ntail));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = blocks.segments[size_t(i)];
      const RowRange rows = rows_of(s);
      Totals::reset(total_vec.data(), total_tail.data(), D, 1);
      for (int64_t q = blocks.first_piece[size_t(i)]; q < blocks.first_piece[size_t(i + 1)]; ++q) {
        for (int64_t v = 0; v < nvec; ++v)
          total_vec[size_t(v)] = combine<R>(total_vec[size_t(v)], vec[size_t(q * nvec + v)]);
        for (int64_t d = 0; d < ntail; ++d)
          total_tail[size_t(d)] = reduce_combine<R, acc_t<T>>(total_tail[size_t(d)], tail[size_t(q * ntail + d)]);
      }
      store_totals<T, R, kStream>(total_vec.data(), total_tail.data(), D, rows.end - rows.begin, y + s * D);
    }
    if (kStream) fence_streaming_stores();
  });
}

#if defined(__AVX512F__)
// ---- Narrow rows: 1, 2, 4 or 8 features of f32, bf16 or f16, 16 bytes at most
// (per-byte scores, say log-probabilities, or small per-byte vectors, summed into
// words). Row by row, each word of 1-9 rows costs a mispredicted loop exit and a
// chain of dependent adds, far more than its few bytes: on one thread of the
// 2-core VM (T = 2^22, baseline build, D = 1) 17.4 ns a word of 1-9 rows, 9.9 ns
// when every word has 9. Here 16 words are reduced at once. Each word's rows are
// read 16 elements at a time, the identity put in the lanes past its end; a
// transpose of whole rows (16 / D words to a transpose) turns them into vectors
// that hold row k of each of those words; row after row is combined into one
// vector, which then holds the words' results in the output's layout. Each
// element combines its word's rows in order from the identity, and the identity
// rows past a word's end change nothing (x + 0 is x for every x but -0, and a sum
// that starts at +0 is never -0; max/min keep x against their identity), so the
// result has the row-by-row bits. The 16 words take as many rounds of 16 elements
// as the longest needs. Words of 17-256 rows are reduced row by row; longer ones
// go to reduce_shared_blocks, in the reduce's blocks.
// Measured (T = 2^22, words 1..9, mean, calls of each variant taking turns):
// f32 D = 4 7.5 -> 4.1 ms (the row-by-row variant chosen before was the
// baseline's), f32 D = 2 8.4 -> 3.1, bf16 D = 4 12.8 -> 4.4, bf16 D = 8 8.5 ->
// 5.9. Tried and not used: AVX-512 gathers of row k of 16 words (D = 1, equal
// lengths 4.6 -> 9.6 ms: a gather cost about 130 cycles there); one 16 x 16
// transpose for every D, then the features interleaved back (f32 D = 4 11.7 ms);
// per-word branches on what is left of each word (mispredicted: f32 D = 4 8.4 ms);
// masked loads of every word (where whole loads are safe, they are faster: f32
// D = 8 on words of real text 16.4 -> 12.1 ms); D = 16, one row per round (f32
// 25 ms against 11.4 row by row, since every word pays for the rounds of the
// group's longest).

// The 4 x 4 transpose of 128-bit lanes: lane L of vector i goes to lane i of
// vector L.
inline void transpose_lanes4x4(__m512& a, __m512& b, __m512& c, __m512& d) {
  const __m512 ab_low = _mm512_shuffle_f32x4(a, b, 0x44), ab_high = _mm512_shuffle_f32x4(a, b, 0xEE);
  const __m512 cd_low = _mm512_shuffle_f32x4(c, d, 0x44), cd_high = _mm512_shuffle_f32x4(c, d, 0xEE);
  a = _mm512_shuffle_f32x4(ab_low, cd_low, 0x88);
  b = _mm512_shuffle_f32x4(ab_low, cd_low, 0xDD);
  c = _mm512_shuffle_f32x4(ab_high, cd_high, 0x88);
  d = _mm512_shuffle_f32x4(ab_high, cd_high, 0xDD);
}

// rows[i] -> rows[k]: element j of the result's vector k is element k of input
// vector j (16 x 16 floats, in four rounds of shuffles).
inline void transpose16(__m512 (&rows)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: its four runs of rows, from lane L of four vectors
    rows[c] = u[c], rows[4 + c] = u[4 + c], rows[8 + c] = u[8 + c], rows[12 + c] = u[12 + c];
    transpose_lanes4x4(rows[c], rows[4 + c], rows[8 + c], rows[12 + c]);
  }
}

// The same for rows of kD floats, 16 / kD to a vector: row k of the result's vector
// i is row i of input vector k (a transpose of whole rows: 16 x 16 floats for
// kD = 1, 8 x 8 pairs, 4 x 4 lanes, 2 x 2 halves for kD = 8).
template <int kD>
inline void transpose_rows(__m512 (&v)[16 / kD]) {
  if constexpr (kD == 1) {
    transpose16(v);
  } else if constexpr (kD == 2) {  // 8 x 8 doubles
    __m512 u[8];
    for (int i = 0; i < 4; ++i) {  // u[2i + c], lane L: rows 2i, 2i + 1 of column 2L + c
      const __m512d a = _mm512_castps_pd(v[2 * i]), b = _mm512_castps_pd(v[2 * i + 1]);
      u[2 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[2 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
    for (int c = 0; c < 2; ++c) {  // column 2L + c: from lane L of u[c], u[2 + c], u[4 + c], u[6 + c]
      v[c] = u[c], v[2 + c] = u[2 + c], v[4 + c] = u[4 + c], v[6 + c] = u[6 + c];
      transpose_lanes4x4(v[c], v[2 + c], v[4 + c], v[6 + c]);
    }
  } else if constexpr (kD == 4) {
    transpose_lanes4x4(v[0], v[1], v[2], v[3]);
  } else {
    static_assert(kD == 8, "rows of 1, 2, 4 or 8 floats");
    const __m512 low = _mm512_shuffle_f32x4(v[0], v[1], 0x44), high = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
    v[0] = low;
    v[1] = high;
  }
}

// The rows that reduce_narrow_rows takes: 1, 2, 4 or 8 features, 16 bytes at most.
// (f32 D = 8 is faster row by row on words of real text, where most groups of 16
// words hold one of 13-16 rows: 12.1 ms against 8.0 for the AVX2 build, on 4.7 MB
// of the standard library's source; bf16 D = 8 6.6 against 7.4.)
constexpr bool transposes_rows_of(int64_t D, int64_t element_bytes) {
  return (D == 1 || D == 2 || D == 4 || D == 8) && D * element_bytes <= 16;
}

// Words of at most this many rows go through the transpose.
constexpr int64_t kTransposeRows = 16;

// Up to 16 elements of T at p (the lanes of `valid`) as floats, the identity
// elsewhere; the conversions are exact, as to_acc's. `whole`: all 16 lie inside
// the buffer, so a plain load can read them (the masked load is slower here).
template <typename T>
inline __m512 load_narrow_elements(const T* p, __mmask16 valid, __m512 identity, bool whole) {
  if constexpr (std::is_same_v<T, float>) {
    if (whole) return _mm512_mask_mov_ps(identity, valid, _mm512_loadu_ps(p));
    return _mm512_mask_loadu_ps(identity, valid, p);
  } else {
    const __m256i halves = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                 : _mm256_maskz_loadu_epi16(valid, p);
    __m512 v;
    if constexpr (std::is_same_v<T, bf16_t>)
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
    else
      v = _mm512_cvtph_ps(halves);
    return _mm512_mask_mov_ps(identity, valid, v);
  }
}

// 16 floats stored as T at the lanes of `keep`, each rounded as from_acc rounds.
template <typename T>
inline void store_narrow_elements(T* p, __mmask16 keep, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, keep, v);
  } else {
    f32xN f;
    std::memcpy(&f, &v, sizeof f);
    __m512 rounded;
    if constexpr (std::is_same_v<T, bf16_t>) {
      const u32xN bits = bf16_bits(f);  // the bf16 in each lane's low half
      std::memcpy(&rounded, &bits, sizeof rounded);
      _mm256_mask_storeu_epi16(p, keep, _mm512_cvtepi32_epi16(_mm512_castps_si512(rounded)));
    } else {
      const f32xN r = canonical_nans(f);
      std::memcpy(&rounded, &r, sizeof rounded);
      _mm256_mask_storeu_epi16(p, keep, _mm512_cvtps_ph(rounded, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// combine (above) on intrinsics: the first NaN stays, ties keep the earlier value.
// For max, v replaces acc where acc is not NaN and !(v <= acc), which holds where v
// is greater or NaN (an unordered compare is true): two compares, the first one
// masking the second.
template <Reduce R>
inline __m512 combine_lanes(__m512 acc, __m512 v) {
  if constexpr (R == Reduce::kSum || R == Reduce::kMean) {
    return _mm512_add_ps(acc, v);
  } else {
    const __mmask16 acc_number = _mm512_cmp_ps_mask(acc, acc, _CMP_ORD_Q);
    const __mmask16 take = _mm512_mask_cmp_ps_mask(acc_number, v, acc, R == Reduce::kMax ? _CMP_NLE_UQ : _CMP_NGE_UQ);
    return _mm512_mask_mov_ps(acc, take, v);
  }
}

template <typename T, Reduce R, int kD>
void reduce_narrow_rows(const Runtime& rt, const T* x, const int64_t* offsets, int64_t S, int64_t T_, T* y) {
  static_assert(16 % kD == 0, "a vector holds whole rows");
  constexpr int kWords = 16 / kD;  // words per transpose, whose results fill one vector
  const __m512 identity = _mm512_set1_ps(reduce_identity<R, float>());
  alignas(64) int32_t element_words[16];  // the word (of kWords) of each element of a result vector
  for (int e = 0; e < 16; ++e) element_words[e] = e / kD;
  const __m512i element_word = _mm512_load_si512(element_words);
  const int64_t last_whole = T_ * kD - 16;  // the last element where 16 can be read
  std::vector<int64_t> long_segments;  // of more than a block: reduced in blocks afterwards
  std::mutex long_mutex;
  parallel_for(rt, 0, (S + 15) / 16, 1024, [&](int64_t g0, int64_t g1) {
    std::vector<int64_t> local_long;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t s0 = g * 16, n = std::min<int64_t>(16, S - s0);
      int64_t first[16];                 // each word's first element
      alignas(64) int32_t elements[16];  // its elements (rows * kD)
      alignas(64) int32_t count[16];     // its rows
      int64_t most = 0;
      __mmask16 transposed = 0;  // the words whose results the transpose gives
      for (int64_t j = 0; j < 16; ++j) {
        const RowRange r = j < n ? segment_rows(offsets, s0 + j, T_) : RowRange{0, 0};
        const int64_t len = r.end - r.begin;
        first[j] = r.begin * kD;
        if (len <= kTransposeRows) {
          elements[j] = int32_t(len * kD);
          count[j] = int32_t(len);
          most = std::max(most, len);
          if (j < n) transposed = __mmask16(transposed | (1u << j));
          continue;
        }
        elements[j] = count[j] = 0;  // identity lanes, left out of the store
        if (len > kReduceBlockRows) {
          local_long.push_back(s0 + j);
          continue;
        }
        reduce_tile<T, R, kD>(x, kD, r.begin, r.end, 0, y + (s0 + j) * kD);  // row by row
      }
      // Vector b holds the results of words b * kWords .. b * kWords + kWords - 1, in
      // the output's layout.
      __m512 acc[kD];
      for (int b = 0; b < kD; ++b) acc[b] = identity;
      const __m512i word_elements = _mm512_load_si512(elements);
      for (int32_t c = 0; c * 16 < most * kD; ++c) {  // 16 elements of every word at a time
        // Without branches (one here would mispredict per word): the mask of the
        // elements 16c .. 16c + 15 that each word has, and where they start (clamped
        // to the word's end).
        const __m512i start = _mm512_min_epi32(_mm512_set1_epi32(16 * c), word_elements);
        const __m512i left = _mm512_min_epi32(_mm512_sub_epi32(word_elements, start), _mm512_set1_epi32(16));
        alignas(64) uint32_t masks[16], starts[16];
        _mm512_store_si512(masks, _mm512_sub_epi32(_mm512_sllv_epi32(_mm512_set1_epi32(1), left), _mm512_set1_epi32(1)));
        _mm512_store_si512(starts, start);
#pragma GCC unroll 16
        for (int b = 0; b < kD; ++b) {
          __m512 rows[kWords];
#pragma GCC unroll 16
          for (int i = 0; i < kWords; ++i) {
            const int j = b * kWords + i;
            const int64_t at = first[j] + starts[j];
            rows[i] = load_narrow_elements(x + at, __mmask16(masks[j]), identity, at <= last_whole);
          }
          transpose_rows<kD>(rows);  // rows[k]: row c * kWords + k of each word
#pragma GCC unroll 16
          for (int k = 0; k < kWords; ++k) acc[b] = combine_lanes<R>(acc[b], rows[k]);
        }
      }
      // reduce_finalize: an empty word gives 0, a mean divides by the rows
      const __m512i counts = _mm512_load_si512(count);
      for (int b = 0; b < kD; ++b) {  // element e of vector b: word b * kWords + e / kD
        const __m512i word_of_element = _mm512_add_epi32(_mm512_set1_epi32(b * kWords), element_word);
        const __m512i rows_of_element = _mm512_permutexvar_epi32(word_of_element, counts);
        const __mmask16 empty = _mm512_cmpeq_epi32_mask(rows_of_element, _mm512_setzero_si512());
        if constexpr (R == Reduce::kMean)
          acc[b] = _mm512_mask_div_ps(acc[b], __mmask16(~empty), acc[b], _mm512_cvtepi32_ps(rows_of_element));
        acc[b] = _mm512_mask_mov_ps(acc[b], empty, _mm512_setzero_ps());
        __mmask16 keep = 0xffff;
        if (transposed != 0xffff) {
          keep = 0;
          for (int e = 0; e < 16; ++e) keep = __mmask16(keep | (((transposed >> (b * kWords + e / kD)) & 1u) << e));
        }
        store_narrow_elements(y + (s0 + b * kWords) * kD, keep, acc[b]);
      }
    }
    if (!local_long.empty()) {
      const std::lock_guard<std::mutex> lock(long_mutex);
      long_segments.insert(long_segments.end(), local_long.begin(), local_long.end());
    }
  });
  if (long_segments.empty()) return;
  std::sort(long_segments.begin(), long_segments.end());
  reduce_shared_blocks<T, R, false>(rt, x, offsets, T_, kD, std::move(long_segments), y);
}
#endif

template <typename T, Reduce R, bool kStream>
void reduce_rows(const Runtime& rt, const T* x, const int64_t* offsets, int64_t S, int64_t T_,
                 int64_t D, T* y) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    if (transposes_rows_of(D, sizeof(T))) switch (D) {
      case 1: return reduce_narrow_rows<T, R, 1>(rt, x, offsets, S, T_, y);
      case 2: return reduce_narrow_rows<T, R, 2>(rt, x, offsets, S, T_, y);
      case 4: return reduce_narrow_rows<T, R, 4>(rt, x, offsets, S, T_, y);
      case 8:
        if constexpr (transposes_rows_of(8, sizeof(T))) return reduce_narrow_rows<T, R, 8>(rt, x, offsets, S, T_, y);
        break;
      default: break;
    }
  }
#endif
  using A = acc_t<T>;
  // Loads per wide tile: 16 accumulator vectors (bf16 fills two per load).
  constexpr int kWideLoads = 16 / Lanes<T>::K;
  // Segments too long for one thread are set aside and reduced afterwards by all
  // threads: one sequence, or a long segment among many short ones, would otherwise
  // keep one thread busy while the others wait.
  const auto rows_of = [&](int64_t s) { return segment_rows(offsets, s, T_); };
  std::vector<int64_t> shared = for_each_short_segment(
      rt, S, segment_grain(S, T_, D), shared_segment_rows(rt.threads, T_), rows_of,
      [&](int64_t s, RowRange rows) {
        const int64_t count = rows.end - rows.begin;
        T* out = y + s * D;
        if (count == 0) {  // every reduce gives 0 (max/min would give their identity)
          std::memset(static_cast<void*>(out), 0, sizeof(T) * size_t(D));
          return;
        }
        const A divisor = A(count);  // used by mean only
        int64_t d0 = 0;
        if constexpr (R == Reduce::kSum || R == Reduce::kMean) {
          if (count > kReduceBlockRows) {  // a long segment: the reduce's blocks
            reduce_long_segment<T, R, kStream>(x, D, rows, out);
            return;
          }
        }
        reduce_tiles<T, R, kWideLoads, kStream>(x, D, rows, divisor, d0, out);
        reduce_tiles<T, R, 4, kStream>(x, D, rows, divisor, d0, out);  // what is left of whole
        reduce_tiles<T, R, 1, kStream>(x, D, rows, divisor, d0, out);  // vectors: 4 chains, then 1
        for (; d0 < D; ++d0) reduce_tile<T, R, 1>(x, D, rows.begin, rows.end, d0, out);
      },
      [] { if (kStream) fence_streaming_stores(); });
  if (!shared.empty()) reduce_shared_blocks<T, R, kStream>(rt, x, offsets, T_, D, std::move(shared), y);
}

// Streamed outputs measured in one process on the 2-core VM (T = 2^20, D = 256,
// mean, best of 15): f32 28.9 against 29.8 ms, bf16 13.0 against 13.7 ms; reading
// the f32 input alone takes about 24.6 ms.
template <typename T, Reduce R>
void reduce_rows(const Runtime& rt, const T* x, const int64_t* offsets, int64_t S, int64_t T_,
                 int64_t D, T* y) {
  // (use_streaming_stores also ensures that every vector streamed is aligned.)
  const bool stream = use_streaming_stores(y, S * D * int64_t(sizeof(T)), D * int64_t(sizeof(T)));
  if (stream) reduce_rows<T, R, true>(rt, x, offsets, S, T_, D, y);
  else reduce_rows<T, R, false>(rt, x, offsets, S, T_, D, y);
}

// The sum/mean backward: every row of a segment gets grad_y's row (divided by the
// segment's length for mean). For mean, each tile of the divided row is
// formed once, with the forward's vector conversions, then copied to every row
// of the segment; for sum, grad_y's row is copied as it is. Measured against
// segment_expand, which writes the same bytes (T = 2^20, D = 256): with scalar
// conversions the mean took 124 ms for f16 and 13.9 ms for bf16 (expand 7.5 and
// 7.2 ms), now 7.1 and 7.1 ms; the f32 sum took 22.7 ms while its scale loop
// compiled to a memcpy into the tile (mean 14.6 ms), now 13.9 ms.
template <typename T, Reduce R>
void scale_to_rows(const Runtime& rt, const T* grad_y, const int64_t* offsets, int64_t S, int64_t T_,
                   int64_t D, T* grad_x) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int64_t kTile = 256;  // features scaled at once: a whole number of vectors
  static_assert(kTile % L::N == 0, "a tile is whole vectors");
  const int64_t row_bytes = D * int64_t(sizeof(T));
  if (narrow_rows(row_bytes)) {  // rows of a few features (pooling_cpu_segments.h)
    return fill_narrow_rows(rt, row_bytes, offsets, S, T_, grad_x, [&](int64_t s, uint8_t* row) {
      if (R == Reduce::kSum) {  // grad_y's row as it is
        std::memcpy(row, grad_y + s * D, size_t(row_bytes));
        return;
      }
      // divided as the tiles' scalar tail below divides: the same bits
      const int64_t length = offsets[s + 1] - offsets[s];
      T scaled[32 / sizeof(T)];
      for (int64_t j = 0; j < D; ++j) scaled[j] = from_acc<T>(reduce_grad_scaled<R, A>(to_acc(grad_y[s * D + j]), length));
      std::memcpy(row, scaled, size_t(row_bytes));
    });
  }
  const RowWriter writer{use_streaming_stores(grad_x, T_ * row_bytes, row_bytes)};
  const auto rows_of = [&](int64_t s) { return segment_rows(offsets, s, T_); };
  for_each_segment_part(rt, S, segment_grain(S, T_, D), shared_segment_rows(rt.threads, T_), rows_of,
                        [&](int64_t s, RowRange part, RowRange rows) {
    if (part.end == part.begin) return;
    const T* g = grad_y + s * D;
    if (R == Reduce::kSum) {  // copy grad_y's row as it is
      for (int64_t t = part.begin; t < part.end; ++t) writer.copy(grad_x + t * D, g, size_t(row_bytes));
      return;
    }
    const int64_t length = rows.end - rows.begin;  // > 0: part is not empty
    const A divisor = A(length);
    alignas(64) T scaled[kTile];
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      const int64_t nd = std::min(kTile, D - d0);
      int64_t j = 0;
      for (; j + L::N <= nd; j += L::N) {
        V v[L::K];
        L::load(g + d0 + j, v);
        for (int k = 0; k < L::K; ++k) v[k] = v[k] / divisor;  // as reduce_grad_scaled
        L::template store<false>(scaled + j, v);
      }
      for (; j < nd; ++j) scaled[j] = from_acc<T>(reduce_grad_scaled<R, A>(to_acc(g[d0 + j]), length));
      for (int64_t t = part.begin; t < part.end; ++t) writer.copy(grad_x + t * D + d0, scaled, sizeof(T) * size_t(nd));
    }
  }, [&] { writer.finish(); });
}

// The max/min backward over features [d0, d0 + kLoads * N) of one segment, for
// as many whole tiles as fit, advancing d0: per feature, the first row whose
// value equals the result (NaN matching NaN) gets grad_y, every other row 0.
// Masks replace the scalar code's branches (measured 475 ms for f32, T = 2^20,
// D = 256, against 16 ms for the mean backward).
template <typename T, int kLoads, bool kStream>
inline void first_attaining_tiles(const T* g, const T* x, const T* result, int64_t D, RowRange rows,
                                  int64_t& d0, T* grad_x) {
  using L = Lanes<T>;
  using V = typename L::V;
  using M = decltype(V{} == V{});
  for (; d0 + kLoads * L::N <= D; d0 += kLoads * L::N) {
    V r[kLoads][L::K];
    M found[kLoads][L::K];
    for (int k = 0; k < kLoads; ++k) {
      L::load(result + d0 + k * L::N, r[k]);
      for (int j = 0; j < L::K; ++j) found[k][j] = M{};
    }
    for (int64_t t = rows.begin; t < rows.end; ++t) {
      for (int k = 0; k < kLoads; ++k) {
        V v[L::K];
        M take[L::K];
        L::load(x + t * D + d0 + k * L::N, v);
        for (int j = 0; j < L::K; ++j) {
          take[j] = attains_lanes(v[j], r[k][j]) & ~found[k][j];
          found[k][j] |= take[j];
        }
        L::template select<kStream>(g + d0 + k * L::N, take, grad_x + t * D + d0 + k * L::N);
      }
    }
  }
}

// Feature d of rows [rows.begin, rows.end), one row at a time: g[d] at the first
// row that attains result[d], 0 elsewhere.
template <typename T>
inline void first_attaining_feature(const T* g, const T* x, const T* result, int64_t D, int64_t d, RowRange rows,
                                    T* grad_x) {
  bool found = false;
  for (int64_t t = rows.begin; t < rows.end; ++t) {
    const bool take = !found && attains(to_acc(x[t * D + d]), to_acc(result[d]));
    found = found || take;
    grad_x[t * D + d] = take ? g[d] : from_acc<T>(acc_t<T>(0));
  }
}

// The max/min backward of segments too long for one thread, in pieces
// (SegmentPieces) that all threads share, reading x once: (1) each piece finds,
// per feature, the first of its rows that attains the result (that row's index in
// the piece, or -1); (2) each segment keeps, per feature, its first piece's find
// only; (3) each piece writes its rows: grad_y at the row found, 0 elsewhere. The
// indices are kept as floats in the layout of the accumulator vectors (Lanes),
// exact since a piece has kSharedPieceRows rows.
template <typename T, bool kStream>
void max_min_backward_shared(const Runtime& rt, const T* grad_y, const T* x, const T* y,
                             const int64_t* offsets, int64_t T_, int64_t D, std::vector<int64_t> long_segments,
                             T* grad_x) {
  using L = Lanes<T>;
  using V = typename L::V;
  using M = decltype(V{} == V{});
  using A = acc_t<T>;
  static_assert(kSharedPieceRows < (int64_t(1) << 24), "row indices in a piece are exact floats");
  const auto rows_of = [&](int64_t s) { return segment_rows(offsets, s, T_); };
  const SegmentPieces pieces(std::move(long_segments), rows_of);
  const int64_t nvec = D / L::N * L::K, vec_end = D / L::N * L::N, ntail = D - vec_end;
  std::vector<V> found(size_t(pieces.count() * nvec));  // (1)'s indices, then (2)'s
  std::vector<A> found_tail(size_t(pieces.count() * ntail));
  parallel_for(rt, 0, pieces.count(), 1, [&](int64_t p0, int64_t p1) {  // (1)
    std::vector<V> result(static_cast<size_t>(nvec));
    pieces.for_each(p0, p1, rows_of, [&](int64_t s, const SegmentPieces::Piece& piece) {
      for (int64_t d0 = 0; d0 < vec_end; d0 += L::N) L::load(y + s * D + d0, &result[size_t(d0 / L::N * L::K)]);
      V* index = found.data() + piece.number * nvec;
      A* index_tail = found_tail.data() + piece.number * ntail;
      std::fill(index, index + nvec, V{} - A(1));
      std::fill(index_tail, index_tail + ntail, A(-1));
      for (int64_t t = piece.rows.begin; t < piece.rows.end; ++t) {
        const A row = A(t - piece.rows.begin);
        for (int64_t d0 = 0; d0 < vec_end; d0 += L::N) {
          V v[L::K];
          L::load(x + t * D + d0, v);
          for (int j = 0; j < L::K; ++j) {
            const int64_t k = d0 / L::N * L::K + j;
            const V r = result[size_t(k)];
            const M take = attains_lanes(v[j], r) & (index[k] < A(0));
            index[k] = take ? V{} + row : index[k];
          }
        }
        for (int64_t d = vec_end; d < D; ++d)
          if (index_tail[d - vec_end] < A(0) && attains(to_acc(x[t * D + d]), to_acc(y[s * D + d])))
            index_tail[d - vec_end] = row;
      }
    });
  });
  parallel_for(rt, 0, int64_t(pieces.segments.size()), 1, [&](int64_t i0, int64_t i1) {  // (2)
    std::vector<M> seen(static_cast<size_t>(nvec));
    std::vector<bool> seen_tail(static_cast<size_t>(ntail));
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(seen.begin(), seen.end(), M{});
      std::fill(seen_tail.begin(), seen_tail.end(), false);
      for (int64_t p = pieces.first_piece[size_t(i)]; p < pieces.first_piece[size_t(i + 1)]; ++p) {
        for (int64_t k = 0; k < nvec; ++k) {
          V& index = found[size_t(p * nvec + k)];
          const M here = index >= A(0);
          index = seen[size_t(k)] ? V{} - A(1) : index;
          seen[size_t(k)] |= here;
        }
        for (int64_t d = 0; d < ntail; ++d) {
          A& index = found_tail[size_t(p * ntail + d)];
          const bool here = index >= A(0);
          if (seen_tail[size_t(d)]) index = A(-1);
          seen_tail[size_t(d)] = seen_tail[size_t(d)] || here;
        }
      }
    }
  });
  parallel_for(rt, 0, pieces.count(), 1, [&](int64_t p0, int64_t p1) {  // (3)
    pieces.for_each(p0, p1, rows_of, [&](int64_t s, const SegmentPieces::Piece& piece) {
      const V* index = found.data() + piece.number * nvec;
      const A* index_tail = found_tail.data() + piece.number * ntail;
      const T* g = grad_y + s * D;
      for (int64_t t = piece.rows.begin; t < piece.rows.end; ++t) {
        const A row = A(t - piece.rows.begin);
        for (int64_t d0 = 0; d0 < vec_end; d0 += L::N) {
          M take[L::K];
          for (int j = 0; j < L::K; ++j) take[j] = index[d0 / L::N * L::K + j] == row;
          L::template select<kStream>(g + d0, take, grad_x + t * D + d0);
        }
        for (int64_t d = vec_end; d < D; ++d)
          grad_x[t * D + d] = index_tail[d - vec_end] == row ? g[d] : from_acc<T>(A(0));
      }
    });
    if (kStream) fence_streaming_stores();
  });
}

#if defined(__AVX512F__)
// ---- The max/min backward of narrow rows: kD = 1, 2, 4 or 8 features of f32,
// bf16 or f16 (transposes_rows_of: at most 16 bytes a row). Row by row, each word of
// a few rows costs a mispredicted loop exit, and rows narrower than a vector go one
// feature at a time. Here a word is read 16 elements (16 / kD rows) at a time: one
// load, one comparison with its results repeated across the lanes, and one store of
// grad_y at the first row that attains each feature's result (the lowest such lane
// of the feature, as the row-by-row scan finds it), 0 elsewhere. A store may spill
// past the word's end into rows of later words of the same task, which the same
// thread writes afterwards (or, for a segment too long for one thread, the shared
// pass after this one); near the task's end it is masked.
// Measured (T = 2^22, words 1..9, max, calls taking turns, against the code each
// width took before): f32 D = 2 16.8 -> 4.0-4.6 ms, bf16 D = 2 18.7 -> 4.6, bf16
// D = 4 30.4 -> 6.8, f16 D = 4 18.9 -> 7.1; rows of 16 bytes as fast as the
// baseline build's vectors (f32 D = 4 7.0 against 6.9, bf16 D = 8 8.3 against 8.7,
// f16 D = 8 8.3 against the AVX2 build's 8.3); D = 1 2.5 ms against 2.3 for the
// one-feature version this generalizes (12.0 row by row; torch.segment_reduce's
// backward 20-30 ms).

// Lane i of the 16 holds feature i % kD: the lanes of every feature, each of its
// own lowest set in `attaining`, as first_lanes(attaining); `pending` loses the
// lanes of each feature found.
template <int kD>
inline __mmask16 first_lanes_of_features(__mmask16 attaining, uint32_t& pending) {
  if constexpr (kD == 1) {  // one feature: the lowest lane, and none pending once one is found
    pending &= attaining ? 0u : 0xffffu;
    return __mmask16(attaining & (0u - attaining));
  }
  uint32_t seen = attaining;  // lane i set: a lane i - j * kD (j >= 0) is set
  for (int shift = kD; shift < 16; shift *= 2) seen |= seen << shift;
  seen &= 0xffffu;
  constexpr uint32_t kEveryFeatureLane = 0xffffu / ((1u << kD) - 1);  // bit 0 of each group of kD
  pending &= ~((seen >> (16 - kD)) * kEveryFeatureLane);  // the features seen, in every lane
  return __mmask16(attaining & ~(seen << kD));
}

template <typename T, int kD>
void max_min_backward_narrow(const Runtime& rt, const T* grad_y, const T* x, const T* y,
                             const int64_t* offsets, int64_t S, int64_t T_, T* grad_x) {
  static_assert(16 % kD == 0, "a load holds whole rows");
  const int64_t shared_rows = shared_segment_rows(rt.threads, T_);
  const int64_t elements_total = T_ * kD;
  // lane i of a vector of one word's kD results or gradients takes element i % kD
  alignas(64) int32_t feature_of_lane[16];
  alignas(32) int16_t feature_of_lane16[16];
  for (int i = 0; i < 16; ++i) feature_of_lane[i] = feature_of_lane16[i] = int16_t(i % kD);
  const __m512i repeat32 = _mm512_load_si512(feature_of_lane);
  const __m256i repeat16 = _mm256_load_si256(reinterpret_cast<const __m256i*>(feature_of_lane16));
  const __mmask16 one_row = __mmask16((1u << kD) - 1);
  std::vector<int64_t> long_segments;
  std::mutex long_mutex;
  parallel_for(rt, 0, S, segment_grain(S, T_, kD), [&](int64_t s0, int64_t s1) {
    std::vector<int64_t> local_long;
    const int64_t task_end = segment_rows(offsets, s1 - 1, T_).end * kD;  // this task's elements end here
    for (int64_t s = s0; s < s1; ++s) {
      const RowRange rows = segment_rows(offsets, s, T_);
      if (rows.end - rows.begin >= shared_rows) {
        local_long.push_back(s);
        continue;
      }
      // the word's results and gradients, repeated in every row of a vector
      __m512 r, g32;
      __m256i g16;
      if constexpr (kD == 1) {
        r = _mm512_set1_ps(to_acc(y[s]));
        if constexpr (std::is_same_v<T, float>) g32 = _mm512_set1_ps(grad_y[s]);
        else g16 = _mm256_set1_epi16(short(grad_y[s].bits));
      } else {
        r = _mm512_permutexvar_ps(repeat32, load_narrow_elements(y + s * kD, one_row, _mm512_setzero_ps(), false));
        if constexpr (std::is_same_v<T, float>)
          g32 = _mm512_permutexvar_ps(repeat32, _mm512_maskz_loadu_ps(one_row, grad_y + s * kD));
        else
          g16 = _mm256_permutexvar_epi16(repeat16, _mm256_maskz_loadu_epi16(one_row, grad_y + s * kD));
      }
      const __mmask16 r_nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
      uint32_t pending = 0xffffu;  // the lanes of the features not found yet
      // elements [at, at + 16) of the stream, of which the lanes of `valid` are the word's
      const auto write_elements = [&](int64_t at, __mmask16 valid) {
        const __m512 v = load_narrow_elements(x + at, valid, _mm512_setzero_ps(), at + 16 <= elements_total);
        // attains: v equals the result, or both are NaN (one feature: a branch, as its
        // result is rarely NaN, one compare fewer)
        __mmask16 attaining;
        if constexpr (kD == 1)
          attaining = r_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, r, _CMP_EQ_OQ);
        else
          attaining = _mm512_cmp_ps_mask(v, r, _CMP_EQ_OQ) | (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & r_nan);
        attaining = __mmask16(attaining & valid & pending);
        const __mmask16 first = first_lanes_of_features<kD>(attaining, pending);
        const __mmask16 store = at + 16 <= task_end ? __mmask16(0xffff) : valid;
        T* out = grad_x + at;
        if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(out, store, _mm512_maskz_mov_ps(first, g32));
        else _mm256_mask_storeu_epi16(out, store, _mm256_maskz_mov_epi16(first, g16));
      };
      const int64_t begin = rows.begin * kD, end = rows.end * kD;
      if (end - begin <= 16) {  // most words: one load, no loop (D = 1: 10% faster)
        write_elements(begin, __mmask16((1u << (end - begin)) - 1));
        continue;
      }
      for (int64_t at = begin; at < end; at += 16)
        write_elements(at, end - at >= 16 ? __mmask16(0xffff) : __mmask16((1u << (end - at)) - 1));
    }
    if (!local_long.empty()) {
      const std::lock_guard<std::mutex> lock(long_mutex);
      long_segments.insert(long_segments.end(), local_long.begin(), local_long.end());
    }
  });
  if (long_segments.empty()) return;
  std::sort(long_segments.begin(), long_segments.end());
  max_min_backward_shared<T, false>(rt, grad_y, x, y, offsets, T_, kD, std::move(long_segments), grad_x);
}
#endif

template <typename T, bool kStream>
void max_min_backward_rows(const Runtime& rt, const T* grad_y, const T* x, const T* y,
                           const int64_t* offsets, int64_t S, int64_t T_, int64_t D, T* grad_x) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    if (transposes_rows_of(D, sizeof(T))) switch (D) {
      case 1: return max_min_backward_narrow<T, 1>(rt, grad_y, x, y, offsets, S, T_, grad_x);
      case 2: return max_min_backward_narrow<T, 2>(rt, grad_y, x, y, offsets, S, T_, grad_x);
      case 4: return max_min_backward_narrow<T, 4>(rt, grad_y, x, y, offsets, S, T_, grad_x);
      case 8:
        if constexpr (transposes_rows_of(8, sizeof(T)))
          return max_min_backward_narrow<T, 8>(rt, grad_y, x, y, offsets, S, T_, grad_x);
    }
  }
#endif
  std::vector<int64_t> long_segments = for_each_short_segment(
      rt, S, segment_grain(S, T_, D), shared_segment_rows(rt.threads, T_),
      [&](int64_t s) { return segment_rows(offsets, s, T_); },
      [&](int64_t s, RowRange rows) {
        const T* g = grad_y + s * D;
        const T* result = y + s * D;
        int64_t d0 = 0;
        first_attaining_tiles<T, 4, kStream>(g, x, result, D, rows, d0, grad_x);
        first_attaining_tiles<T, 1, kStream>(g, x, result, D, rows, d0, grad_x);
        for (; d0 < D; ++d0) first_attaining_feature(g, x, result, D, d0, rows, grad_x);  // the last D % N, one at a time
      },
      [] { if (kStream) fence_streaming_stores(); });
  if (!long_segments.empty())
    max_min_backward_shared<T, kStream>(rt, grad_y, x, y, offsets, T_, D, std::move(long_segments), grad_x);
}

}  // namespace

void segment_reduce_backward_cpu(const Runtime& rt, DType dtype, const void* grad_y, const void* x,
                                 const void* y, const int64_t* offsets, int64_t S, int64_t T,
                                 int64_t D, Reduce reduce, void* grad_x) {
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    const auto* g = static_cast<const V*>(grad_y);
    auto* out = static_cast<V*>(grad_x);
    if (reduce == Reduce::kMean) return scale_to_rows<V, Reduce::kMean>(rt, g, offsets, S, T, D, out);
    if (reduce == Reduce::kSum) return scale_to_rows<V, Reduce::kSum>(rt, g, offsets, S, T, D, out);
    const auto* xs = static_cast<const V*>(x);
    const auto* ys = static_cast<const V*>(y);
    const int64_t row_bytes = D * int64_t(sizeof(V));
    if (use_streaming_stores(out, T * row_bytes, row_bytes))
      max_min_backward_rows<V, true>(rt, g, xs, ys, offsets, S, T, D, out);
    else
      max_min_backward_rows<V, false>(rt, g, xs, ys, offsets, S, T, D, out);
  });
}

bool reduces_narrow_rows(DType dtype, int64_t D) {
#if defined(__AVX512F__)
  return dtype != DType::kFloat64 && transposes_rows_of(D, dtype == DType::kFloat32 ? 4 : 2);
#else
  (void)dtype, (void)D;
  return false;
#endif
}

int64_t vector_features(DType dtype) {
#if !defined(__AVX512F__) && !defined(__AVX2__)
  if (dtype == DType::kFloat16) return 0;  // the baseline build converts f16 lane by lane
#endif
  int64_t n = 0;
  dispatch_float_types(dtype, [&](auto* tag) { n = Lanes<std::remove_pointer_t<decltype(tag)>>::N; });
  return n;
}

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
