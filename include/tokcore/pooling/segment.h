// Per-element arithmetic of the segment ops (segment_reduce and its backward,
// segment_expand, segment_pack, segment_unpack), shared by CPU and CUDA kernels.
//
// A segment s covers rows [offsets[s], offsets[s+1]) of a [T, D] row-major
// matrix. Accumulation is in acc_t<T> (float32, float64 for float64).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tokcore/common/dtype.h"
#include "tokcore/common/macros.h"

namespace tokcore {
namespace pooling {

enum class Reduce : int { kSum = 0, kMean = 1, kMax = 2, kMin = 3 };

template <typename A> TOKCORE_HD bool is_nan(A v) { return v != v; }

TOKCORE_HD float infinity_of(float) { return HUGE_VALF; }
TOKCORE_HD double infinity_of(double) { return HUGE_VAL; }

template <Reduce R, typename A>
TOKCORE_HD A reduce_identity() {
  if (R == Reduce::kMax) return -infinity_of(A(0));
  if (R == Reduce::kMin) return infinity_of(A(0));
  return A(0);
}

// max/min: NaN propagates (the first NaN is kept); ties keep the earlier value.
template <Reduce R, typename A>
TOKCORE_HD A reduce_combine(A acc, A v) {
  if (R == Reduce::kSum || R == Reduce::kMean) return acc + v;
  if (is_nan(acc)) return acc;
  if (is_nan(v)) return v;
  if (R == Reduce::kMax) return v > acc ? v : acc;
  return v < acc ? v : acc;
}

// Calls f with std::integral_constant<Reduce, reduce>: the one place where a
// runtime reduce becomes a template argument (CPU and CUDA kernels alike).
template <typename F>
inline void dispatch_reduce(Reduce reduce, F&& f) {
  switch (reduce) {
    case Reduce::kSum: f(std::integral_constant<Reduce, Reduce::kSum>{}); break;
    case Reduce::kMean: f(std::integral_constant<Reduce, Reduce::kMean>{}); break;
    case Reduce::kMax: f(std::integral_constant<Reduce, Reduce::kMax>{}); break;
    case Reduce::kMin: f(std::integral_constant<Reduce, Reduce::kMin>{}); break;
  }
}

// The reduce's order of operations, the same on every device: a segment's rows
// are taken in blocks of kReduceBlockRows, each block is reduced row by row from
// the identity, and the block results are combined in block order. A segment of
// up to kReduceBlockRows rows (a word) is thus reduced row by row. The blocks let
// the GPU reduce a few long segments with many threads (segment_threads.h) while
// CPU and GPU results stay bitwise equal. For max/min the blocks change nothing:
// combining selects, keeping the first NaN and, on ties, the earlier value.
constexpr int64_t kReduceBlockRows = 256;

// Result of a segment of `count` rows; an empty segment gives 0 for every reduce.
template <Reduce R, typename A>
TOKCORE_HD A reduce_finalize(A acc, int64_t count) {
  if (count == 0) return A(0);
  if (R == Reduce::kMean) return acc / A(count);
  return acc;
}

// The backward of sum/mean for one feature of a segment of `count` rows: grad_y's
// value, divided by the count for mean (a division, as the forward's and torch's own
// mean backward: a multiplication by 1 / count is off by an ulp in a third of cases).
template <Reduce R, typename A>
TOKCORE_HD A reduce_grad_scaled(A grad, int64_t count) {
  return (R == Reduce::kMean && count > 0) ? grad / A(count) : grad;
}

// Backward of max/min: the gradient goes to the first row whose value equals
// the result (NaN matching NaN, since a NaN result came from a NaN row).
template <typename A>
TOKCORE_HD bool attains(A x, A y) { return x == y || (is_nan(x) && is_nan(y)); }

// Rows of segment s, clamped into [0, T] so that no offsets, valid or not,
// make a kernel touch memory outside its tensors (the adapters validate offsets
// before calling, but on CUDA that check can be turned off or skipped under graph
// capture: adapter::check_offsets_cuda).
struct RowRange { int64_t begin, end; };

TOKCORE_HD RowRange segment_rows(const int64_t* offsets, int64_t s, int64_t T) {
  int64_t b = offsets[s], e = offsets[s + 1];
  b = b < 0 ? 0 : (b > T ? T : b);
  e = e < b ? b : (e > T ? T : e);
  return RowRange{b, e};
}

// The blocks of the reduce's order (kReduceBlockRows) in a segment's rows: how
// many, and the rows of block k. Every kernel that takes rows in blocks asks these.
TOKCORE_HD int64_t reduce_block_count(RowRange rows) {
  return (rows.end - rows.begin + kReduceBlockRows - 1) / kReduceBlockRows;
}

TOKCORE_HD RowRange reduce_block_rows(RowRange rows, int64_t k) {
  const int64_t b = rows.begin + k * kReduceBlockRows;
  return RowRange{b, rows.end - b < kReduceBlockRows ? rows.end : b + kReduceBlockRows};
}

}  // namespace pooling
}  // namespace tokcore
