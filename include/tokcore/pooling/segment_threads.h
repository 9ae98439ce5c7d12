// Per-thread bodies of the CUDA segment kernels, written as __host__ __device__
// functions so that the host tests (tests/cpp) can run every thread of a launch
// in a loop and compare with the CPU kernels: the GPU's index arithmetic,
// vector widths and edge cases are covered on machines without a GPU.
//
// Thread i of a launch over S * (D / N) threads handles segment i / (D / N) and
// features [(i % (D / N)) * N, + N): consecutive threads read consecutive
// N-element vectors of the same row (coalesced), and each thread walks its
// segment's rows in order, so no atomics are needed and sums are formed in the
// same order as on the CPU (the results match bitwise). Long segments are
// reduced with a thread per block of rows instead (kReduceBlockRows, segment.h),
// in the same order of operations.
//
// The kernels that only write rows (expand, the sum/mean backward, pack, unpack)
// can also split each segment's rows into `parts` interleaved parts: part j
// handles rows (or packed slots) j, j + parts, j + 2 * parts, ... Each row is
// still written once, with the same values, so the result does not depend on
// parts; the split only keeps the GPU busy when a few long segments would give it
// too few threads (row_parts). The reduce forward walks rows in order and runs
// with parts = 1; so does the max/min backward, unless split in two passes (below).
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
constexpr int64_t kFillThreads = int64_t(1) << 20;

inline int64_t row_parts(int64_t segment_threads, int64_t mean_rows) {
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

// Reduces rows [begin, end) of features [col, col + N) row by row from the
// identity: one block of the reduce's order (kReduceBlockRows, segment.h).
// kUnroll rows' loads are kept in flight.
template <typename T, int N, Reduce R, int kUnroll = 4>
TOKCORE_HD void reduce_block_vec(const T* __restrict__ x, int64_t D, int64_t col, int64_t begin,
                                 int64_t end, acc_t<T>* acc) {
  using A = acc_t<T>;
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) acc[j] = reduce_identity<R, A>();
  const T* p = x + begin * D + col;
  TOKCORE_UNROLL_N(kUnroll)
  for (int64_t t = begin; t < end; ++t, p += D) {
    const Vec<T, N> v = load_vec<T, N>(p);
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) acc[j] = reduce_combine<R, A>(acc[j], to_acc(v.v[j]));
  }
}

template <typename T, int N, Reduce R>
TOKCORE_HD void store_reduced(const acc_t<T>* total, int64_t count, T* __restrict__ out) {
  Vec<T, N> v;
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) v.v[j] = from_acc<T>(reduce_finalize<R, acc_t<T>>(total[j], count));
  store_vec<T, N>(out, v);
}

// The reduce forward with one thread per (segment, vector), for the segments of
// fewer than blocks_from_rows rows (reduce_blocks_from_rows, below: the others are
// reduced in blocks, and their threads return). A segment of one block (every
// word) is reduced row by row, which is the blocks' result too (combining the
// identity with a value gives that value's bits). A longer one comes here only
// when the longest segment is not known (offsets unchecked): it is walked one
// feature and one block at a time, so that it needs fewer registers than the
// common case (nvcc -Xptxas -v, sm_90: 40 for bf16 mean, as before the blocks; 48
// with a vector of running totals), and so is slow: every load waits out the
// memory's latency.
template <typename T, int N, Reduce R>
TOKCORE_HD void segment_reduce_thread(int64_t i, const T* __restrict__ x,
                                      const int64_t* __restrict__ offsets, int64_t rows_total,
                                      int64_t D, int64_t blocks_from_rows, T* __restrict__ y) {
  using A = acc_t<T>;
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const int64_t count = rows.end - rows.begin;
  if (count >= blocks_from_rows) return;
  T* out = y + th.s * D + th.col;
  if (count <= kReduceBlockRows) {
    A acc[N];
    reduce_block_vec<T, N, R>(x, D, th.col, rows.begin, rows.end, acc);
    store_reduced<T, N, R>(acc, count, out);
    return;
  }
  TOKCORE_UNROLL_N(1)
  for (int j = 0; j < N; ++j) {
    A total = reduce_identity<R, A>();
    for (int64_t k = 0; k < reduce_block_count(rows); ++k) {
      const RowRange rows_k = reduce_block_rows(rows, k);
      A block = reduce_identity<R, A>();
      TOKCORE_UNROLL_N(1)
      for (int64_t t = rows_k.begin; t < rows_k.end; ++t)
        block = reduce_combine<R, A>(block, to_acc(x[t * D + th.col + j]));
      total = reduce_combine<R, A>(total, block);
    }
    out[j] = from_acc<T>(reduce_finalize<R, A>(total, count));
  }
}

// ---- The reduce forward in blocks, for long segments: a few of them give too
// few (segment, vector) threads to fill the GPU, and one among many short ones
// would leave its threads walking it long after the others are done. Pass 1
// counts the blocks of each segment of at least blocks_from_rows rows (0 for the
// others; an exclusive scan of the counts gives block_begin [S + 1]); pass 2 has
// a thread per (block, vector) write its block's result to `partials` [blocks, D]
// in the accumulator type; pass 3 has a thread per (segment, vector) combine the
// blocks' results of its segment in order, if it has at least blocks_from_rows
// rows: the same operations as segment_reduce_thread.

// Whether every segment is reduced in blocks: the segment threads would leave most
// of an H200 idle, and segments are long enough on average (two blocks or more) to split.
inline bool reduce_in_blocks(int64_t segment_threads, int64_t S, int64_t T) {
  return segment_threads > 0 && segment_threads < kFillThreads / 4 && T >= 2 * kReduceBlockRows * S;
}

// blocks_from_rows when no segment is reduced in blocks.
constexpr int64_t kNoBlocks = INT64_MAX;

// The fewest rows of a segment reduced in blocks: 0 (every segment) for a few long
// segments; one block and a row when a segment that long is among many short ones
// (longest: the most rows of any segment, < 0 where unknown, e.g. offsets that the
// CUDA adapter did not check; such a segment is then walked by the segment threads);
// else kNoBlocks.
inline int64_t reduce_blocks_from_rows(int64_t segment_threads, int64_t S, int64_t T, int64_t longest) {
  if (reduce_in_blocks(segment_threads, S, T)) return 0;
  return longest > kReduceBlockRows ? kReduceBlockRows + 1 : kNoBlocks;
}

// The blocks of the segments of at least blocks_from_rows rows: at most
// T / kReduceBlockRows plus one per such segment, of which there are at most S and
// at most T / blocks_from_rows, for valid offsets (unchecked invalid ones can claim
// more; the passes clamp to this bound).
inline int64_t reduce_blocks_bound(int64_t S, int64_t T, int64_t blocks_from_rows) {
  const int64_t segments = blocks_from_rows > 0 && T / blocks_from_rows < S ? T / blocks_from_rows : S;
  return T / kReduceBlockRows + segments;
}

// Pass 1: the blocks of segment s, or 0 if the segment threads reduce it.
TOKCORE_HD int64_t segment_blocks_in_pass(const int64_t* offsets, int64_t s, int64_t T,
                                          int64_t blocks_from_rows) {
  const RowRange rows = segment_rows(offsets, s, T);
  return rows.end - rows.begin >= blocks_from_rows ? reduce_block_count(rows) : 0;
}

// Pass 2, thread g of blocks_bound * (D / N): block q = g / (D / N) of the list of
// all segments' blocks, features [(g % (D / N)) * N, + N).
template <typename T, int N, Reduce R>
TOKCORE_HD void segment_reduce_block_thread(int64_t g, const T* __restrict__ x,
                                            const int64_t* __restrict__ offsets,
                                            const int64_t* __restrict__ block_begin, int64_t S,
                                            int64_t rows_total, int64_t D,
                                            acc_t<T>* __restrict__ partials) {
  const int64_t nvec = D / N;
  const int64_t q = g / nvec, col = (g % nvec) * N;
  if (S == 0 || q >= block_begin[S]) return;
  // the segment of block q: the last s with block_begin[s] <= q (it has blocks)
  int64_t lo = 0, hi = S;  // block_begin[lo] <= q < block_begin[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (block_begin[mid] <= q) lo = mid;
    else hi = mid;
  }
  const RowRange rows = reduce_block_rows(segment_rows(offsets, lo, rows_total), q - block_begin[lo]);
  acc_t<T> block[N];
  reduce_block_vec<T, N, R>(x, D, col, rows.begin, rows.end, block);
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) partials[q * D + col + j] = block[j];
}

// Pass 3, thread i of S * (D / N). Only the first blocks_bound blocks were written.
template <typename T, int N, Reduce R>
TOKCORE_HD void segment_reduce_combine_thread(int64_t i, const acc_t<T>* __restrict__ partials,
                                              const int64_t* __restrict__ offsets,
                                              const int64_t* __restrict__ block_begin,
                                              int64_t blocks_bound, int64_t rows_total, int64_t D,
                                              int64_t blocks_from_rows, T* __restrict__ y) {
  using A = acc_t<T>;
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  if (rows.end - rows.begin < blocks_from_rows) return;  // the segment threads' segment
  A total[N];
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) total[j] = reduce_identity<R, A>();
  const int64_t end = block_begin[th.s + 1] < blocks_bound ? block_begin[th.s + 1] : blocks_bound;
  // A few threads each read many blocks' results (8 sequences of 2^18 rows: 1024
  // each): keep several blocks' loads in flight, else each waits out the latency.
  TOKCORE_UNROLL_N(8)
  for (int64_t q = block_begin[th.s]; q < end; ++q) {
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) total[j] = reduce_combine<R, A>(total[j], partials[q * D + th.col + j]);
  }
  store_reduced<T, N, R>(total, rows.end - rows.begin, y + th.s * D + th.col);
}

// x and y are read only for max/min (the gradient goes to the first row that
// attains the result; parts must be 1); sum/mean write grad_y (divided by the
// length for mean) to every row of the thread's part.
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
    Vec<T, N> out;
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) out.v[j] = from_acc<T>(reduce_grad_scaled<R, A>(to_acc(g.v[j]), rows.end - rows.begin));
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

// ---- The max/min backward in two passes, for row parts: a few long segments
// (max pooling over sequences) would leave one thread per vector to walk each of
// them. first_row [S, D] starts at kNoRow. Pass 1 has each (segment thread, part)
// find, per feature, the first row of its part that attains the result, and fold
// it into first_row with min (atomicMin on the GPU: min does not depend on the
// order, so the result is deterministic). Pass 2 writes every row: grad_y where the
// row is first_row, 0 elsewhere. The same rows get grad_y as in
// segment_reduce_backward_thread, so the bits are the same.
constexpr int64_t kNoRow = 0x7f7f7f7f7f7f7f7fLL;  // past any row; bytes 0x7f, a memset fills it

// Whether the max/min backward runs in two passes: when its launch is split into
// row parts (row_parts > 1), as the sum/mean backward would be.
inline bool max_min_backward_in_parts(int64_t segment_threads, int64_t mean_rows) {
  return row_parts(segment_threads, mean_rows) > 1;
}

// Pass 1, thread (i, part); min_row(index, row) folds row into first_row[index].
template <typename T, int N, typename MinRow>
TOKCORE_HD void max_min_first_rows_thread(int64_t i, int64_t part, int64_t parts, const T* __restrict__ x,
                                          const T* __restrict__ y, const int64_t* __restrict__ offsets,
                                          int64_t rows_total, int64_t D, MinRow&& min_row) {
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const Vec<T, N> result = load_vec<T, N>(y + th.s * D + th.col);
  int64_t first[N];
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) first[j] = kNoRow;
  int missing = N;  // features not found yet: done when none is left
  for (int64_t t = rows.begin + part; t < rows.end && missing > 0; t += parts) {
    const Vec<T, N> v = load_vec<T, N>(x + t * D + th.col);
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) {
      if (first[j] == kNoRow && attains(to_acc(v.v[j]), to_acc(result.v[j]))) {
        first[j] = t;
        --missing;
      }
    }
  }
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j)
    if (first[j] != kNoRow) min_row(th.s * D + th.col + j, first[j]);
}

// Pass 2, thread (i, part).
template <typename T, int N>
TOKCORE_HD void max_min_write_rows_thread(int64_t i, int64_t part, int64_t parts, const T* __restrict__ grad_y,
                                          const int64_t* __restrict__ first_row,
                                          const int64_t* __restrict__ offsets, int64_t rows_total, int64_t D,
                                          T* __restrict__ grad_x) {
  using A = acc_t<T>;
  const SegmentThread th = segment_thread<N>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  const Vec<T, N> g = load_vec<T, N>(grad_y + th.s * D + th.col);
  int64_t first[N];
  TOKCORE_UNROLL
  for (int j = 0; j < N; ++j) first[j] = first_row[th.s * D + th.col + j];
  for (int64_t t = rows.begin + part; t < rows.end; t += parts) {
    Vec<T, N> out;
    TOKCORE_UNROLL
    for (int j = 0; j < N; ++j) out.v[j] = t == first[j] ? g.v[j] : from_acc<T>(A(0));
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
