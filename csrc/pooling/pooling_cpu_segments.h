// How the CPU segment kernels share segments out over threads. Each parallel task
// takes whole segments (segment_grain of them); a segment too long for one thread
// would keep that thread busy while the others wait, so it is set aside and, once
// the short ones are done, its rows are cut into pieces that all threads share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "pooling_kernels.h"

namespace tokcore {
namespace pooling {

// Segments of at least this many rows are too long for one thread: half a thread's
// share of the T rows. Never with one thread, nor for segments of fewer than two
// blocks of the reduce (kReduceBlockRows).
inline int64_t shared_segment_rows(int64_t threads, int64_t T) {
  if (threads <= 1) return INT64_MAX;
  return std::max<int64_t>(2 * kReduceBlockRows, T / (2 * threads));
}

// Rows per piece of a shared segment: enough to amortize a task, few enough that
// the pieces of one segment spread over every thread.
constexpr int64_t kSharedPieceRows = 4 * kReduceBlockRows;

// Calls body(s, part, rows) for every segment s in [0, S), with rows = rows_of(s) (a
// RowRange) and part = rows for a segment shorter than `shared_rows`, or each of the
// pieces of kSharedPieceRows rows that cover a longer one. Segments go to tasks
// segment_grain at a time; finish() ends each task (a streaming-store fence, say).
// The pieces of all long segments are shared out after the short segments are done.
template <typename RowsOf, typename Body, typename Finish>
void for_each_segment_part(const Runtime& rt, int64_t S, int64_t grain, int64_t shared_rows, const RowsOf& rows_of,
                           const Body& body, const Finish& finish) {
  std::vector<int64_t> long_segments;  // at most 2 * threads of them
  std::mutex long_mutex;
  parallel_for(rt, 0, S, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const RowRange rows = rows_of(s);
      if (rows.end - rows.begin >= shared_rows) {
        const std::lock_guard<std::mutex> lock(long_mutex);
        long_segments.push_back(s);
        continue;
      }
      body(s, rows, rows);
    }
    finish();
  });
  if (long_segments.empty()) return;
  std::vector<int64_t> piece_begin(long_segments.size() + 1, 0);  // the first piece of each long segment
  for (size_t i = 0; i < long_segments.size(); ++i) {
    const RowRange rows = rows_of(long_segments[i]);
    piece_begin[i + 1] = piece_begin[i] + (rows.end - rows.begin + kSharedPieceRows - 1) / kSharedPieceRows;
  }
  parallel_for(rt, 0, piece_begin.back(), 1, [&](int64_t p0, int64_t p1) {
    size_t i = size_t(std::upper_bound(piece_begin.begin(), piece_begin.end(), p0) - piece_begin.begin()) - 1;
    for (int64_t p = p0; p < p1; ++p) {
      while (piece_begin[i + 1] <= p) ++i;  // the long segment holding piece p
      const RowRange rows = rows_of(long_segments[i]);
      const int64_t begin = rows.begin + (p - piece_begin[i]) * kSharedPieceRows;
      body(long_segments[i], RowRange{begin, std::min(rows.end, begin + kSharedPieceRows)}, rows);
    }
    finish();
  });
}

}  // namespace pooling
}  // namespace tokcore
