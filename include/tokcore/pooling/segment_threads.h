// Per-thread bodies of the CUDA segment kernels, written as __host__ __device__
// functions so that the host tests (tests/cpp) can run every thread of a launch
// in a loop and compare with the CPU kernels: the GPU's index arithmetic,
// vector widths and edge cases are covered on machines without a GPU.
//
// Thread i of a launch over S * (D / N) threads handles segment i / (D / N) and
// features [(i % (D / N)) * N, + N): consecutive threads read consecutive
// N-element vectors of the same row (coalesced), and each thread walks its
// segment's rows in order, so no atomics are needed and sums are formed in the
// same order as on the CPU (the results match bitwise).
//
// The kernels that only write rows (expand, the sum/mean backward, pack, unpack)
// can also split each segment's rows into `parts` interleaved parts: part j
// handles rows (or packed slots) j, j + parts, j + 2 * parts, ... Each row is
// still written once, with the same values, so the result does not depend on
// parts; the split only keeps the GPU busy when a few long segments would give it
// too few threads (row_parts). The reduce forward and the max/min backward walk
// rows in order and run with parts = 1.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "tokcore/common/dtype.h"
#include "tokcore/common/macros.h"
#include "tokcore/pooling/segment.h"

namespace tokcore {
namespace pooling {

// N elements of T moved as one load or store (16 bytes for the vector path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
TOKCORE_HD Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
TOKCORE_HD void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <typename T, int N>
TOKCORE_HD Vec<T, N> zero_vec() {
  Vec<T, N> z;
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) z.v[j] = from_acc<T>(acc_t<T>(0));
  return z;
}

// Elements per thread: a 16-byte vector when D is a multiple of it and every
// buffer starts 16-byte aligned (so every row does; null buffers, unused by the
// kernel, count as aligned); else 1.
template <typename T>
inline int segment_vector_width(int64_t D, std::initializer_list<const void*> buffers) {
  constexpr int kVec = 16 / sizeof(T);
  bool aligned = D % kVec == 0;
  for (const void* p : buffers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return aligned ? kVec : 1;
}

// The (segment, feature column) of thread i.
struct SegmentThread {
  int64_t s, col;
};

template <int N>
TOKCORE_HD SegmentThread segment_thread(int64_t i, int64_t D) {
  const int64_t nvec = D / N;
  return SegmentThread{i / nvec, (i % nvec) * N};
}

// Row parts for the row-writing kernels: 1 while S * D / N threads fill the GPU,
// else enough parts to reach about kFillThreads threads, but no more parts than a
// segment has rows on average (a part past its segment's end has nothing to do).
// kFillThreads: a few times the threads an H200 keeps resident (132 SMs x 2048).
inline int64_t row_parts(int64_t segment_threads, int64_t mean_rows) {
  constexpr int64_t kFillThreads = int64_t(1) << 20;
  if (segment_threads <= 0 || segment_threads >= kFillThreads || mean_rows <= 1) return 1;
  const int64_t wanted = (kFillThreads + segment_threads - 1) / segment_threads;
  return wanted < mean_rows ? wanted : mean_rows;
}

// Thread g of a launch over segment_threads * parts threads: its segment thread i
// (as above) and its row part. Consecutive threads stay on consecutive vectors of
// a row, so the accesses of a warp remain coalesced.
struct PartThread {
  int64_t i, part;
};

TOKCORE_HD PartThread part_thread(int64_t g, int64_t segment_threads, int64_t parts) {
  if (parts == 1) return PartThread{g, 0};  // the common case, without a division
  return PartThread{g % segment_threads, g / segment_threads};
}

template <typename T, int N, Reduce R>
TOKCORE_HD void segment_reduce_thread(int64_t i, const T* __restrict__ x,
                                      const int64_t* __restrict__ offsets, int64_t rows_total,
                                      int64_t D, T* __restrict__ y) {
  using A = acc_t<T>;
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  A acc[N];
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) acc[j] = reduce_identity<R, A>();
  const T* p = x + rows.begin * D + th.col;
  TOKCORE_UNROLL_N(4)
  for (int64_t t = rows.begin; t < rows.end; ++t, p += D) {
    const Vec<T, N> v = load_vec<T, N>(p);
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) acc[j] = reduce_combine<R, A>(acc[j], to_acc(v.v[j]));
  }
  Vec<T, N> out;
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) out.v[j] = from_acc<T>(reduce_finalize<R, A>(acc[j], rows.end - rows.begin));
  store_vec<T, N>(y + th.s * D + th.col, out);
}

// x and y are read only for max/min (the gradient goes to the first row that
// attains the result; parts must be 1); sum/mean write grad_y * scale to every
// row of the thread's part.
template <typename T, int N, Reduce R>
TOKCORE_HD void segment_reduce_backward_thread(int64_t i, int64_t part, int64_t parts,
                                               const T* __restrict__ grad_y,
                                               const T* __restrict__ x, const T* __restrict__ y,
                                               const int64_t* __restrict__ offsets,
                                               int64_t rows_total, int64_t D,
                                               T* __restrict__ grad_x) {
  using A = acc_t<T>;
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const Vec<T, N> g = load_vec<T, N>(grad_y + th.s * D + th.col);
  if (R == Reduce::kSum || R == Reduce::kMean) {
    const A scale = reduce_grad_scale<R, A>(rows.end - rows.begin);
    Vec<T, N> out;
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) out.v[j] = from_acc<T>(to_acc(g.v[j]) * scale);
    for (int64_t t = rows.begin + part; t < rows.end; t += parts)
      store_vec<T, N>(grad_x + t * D + th.col, out);
    return;
  }
  const Vec<T, N> result = load_vec<T, N>(y + th.s * D + th.col);
  bool found[N];
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) found[j] = false;
  for (int64_t t = rows.begin; t < rows.end; ++t) {
    const Vec<T, N> v = load_vec<T, N>(x + t * D + th.col);
    Vec<T, N> out;
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) {
      const bool take = !found[j] && attains(to_acc(v.v[j]), to_acc(result.v[j]));
      found[j] = found[j] || take;
      out.v[j] = take ? g.v[j] : from_acc<T>(A(0));
    }
    store_vec<T, N>(grad_x + t * D + th.col, out);
  }
}

template <typename T, int N>
TOKCORE_HD void segment_expand_thread(int64_t i, int64_t part, int64_t parts, const T* __restrict__ y,
                                      const int64_t* __restrict__ offsets, int64_t rows_total,
                                      int64_t D, T* __restrict__ x) {
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const Vec<T, N> v = load_vec<T, N>(y + th.s * D + th.col);
  for (int64_t t = rows.begin + part; t < rows.end; t += parts) store_vec<T, N>(x + t * D + th.col, v);
}

// Rows past max_len are dropped; slots past a segment's length are zero.
template <typename T, int N>
TOKCORE_HD void segment_pack_thread(int64_t i, int64_t part, int64_t parts, const T* __restrict__ x,
                                    const int64_t* __restrict__ offsets, int64_t rows_total,
                                    int64_t D, int64_t max_len, T* __restrict__ packed) {
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const int64_t len = rows.end - rows.begin;
  const int64_t kept = len < max_len ? len : max_len;
  T* out = packed + th.s * max_len * D + th.col;
  for (int64_t k = part; k < max_len; k += parts)
    store_vec<T, N>(out + k * D, k < kept ? load_vec<T, N>(x + (rows.begin + k) * D + th.col)
                                          : zero_vec<T, N>());
}

// The adjoint of segment_pack: rows past max_len get zeros.
template <typename T, int N>
TOKCORE_HD void segment_unpack_thread(int64_t i, int64_t part, int64_t parts,
                                      const T* __restrict__ packed,
                                      const int64_t* __restrict__ offsets, int64_t rows_total,
                                      int64_t D, int64_t max_len, T* __restrict__ x) {
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const T* src = packed + th.s * max_len * D + th.col;
  for (int64_t t = rows.begin + part; t < rows.end; t += parts) {
    const int64_t k = t - rows.begin;
    store_vec<T, N>(x + t * D + th.col, k < max_len ? load_vec<T, N>(src + k * D) : zero_vec<T, N>());
  }
}

}  // namespace pooling
}  // namespace tokcore
