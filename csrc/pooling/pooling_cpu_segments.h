// How the CPU segment kernels share segments out over threads. Each parallel task
// takes whole segments (segment_grain of them); a segment too long for one thread
// would keep that thread busy while the others wait, so it is set aside and, once
// the short ones are done, its rows are cut into pieces that all threads share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// Runs short(s, rows) for every segment s in [0, S) shorter than `shared_rows`,
// segment_grain segments per task, finish() ending each task (a streaming-store
// fence, say); returns the longer ones, in increasing order, for the caller to
// share out. rows_of(s) gives a segment's RowRange.
template <typename RowsOf, typename Short, typename Finish>
std::vector<int64_t> for_each_short_segment(const Runtime& rt, int64_t S, int64_t grain, int64_t shared_rows,
                                            const RowsOf& rows_of, const Short& short_segment,
                                            const Finish& finish) {
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
      short_segment(s, rows);
    }
    finish();
  });
  std::sort(long_segments.begin(), long_segments.end());
  return long_segments;
}

// The long segments cut into pieces of piece_rows rows (the last one of a segment
// shorter), numbered in order: the pieces of segments[0] first. With piece_rows =
// kReduceBlockRows the pieces are the reduce's blocks (segment.h).
struct SegmentPieces {
  struct Piece {
    int64_t number;  // in [0, count())
    int64_t index;   // into segments
    RowRange rows;   // of the piece
    RowRange segment_rows;
  };
  std::vector<int64_t> segments;
  std::vector<int64_t> first_piece;  // of each segment, and the total at the end
  int64_t piece_rows;

  template <typename RowsOf>
  SegmentPieces(std::vector<int64_t> long_segments, const RowsOf& rows_of, int64_t rows_per_piece = kSharedPieceRows)
      : segments(std::move(long_segments)), first_piece(segments.size() + 1, 0), piece_rows(rows_per_piece) {
    for (size_t i = 0; i < segments.size(); ++i) {
      const RowRange rows = rows_of(segments[i]);
      first_piece[i + 1] = first_piece[i] + (rows.end - rows.begin + piece_rows - 1) / piece_rows;
    }
  }
  int64_t count() const { return first_piece.back(); }
  // Piece p; `index` is a hint (the segment of an earlier piece).
  template <typename RowsOf>
  Piece piece(int64_t p, int64_t index, const RowsOf& rows_of) const {
    while (first_piece[size_t(index) + 1] <= p) ++index;
    const RowRange rows = rows_of(segments[size_t(index)]);
    // (within the segment's rows as read now: offsets that another thread changed since
    // the count must give an empty piece, not one reaching past the segment)
    const int64_t begin = std::min(rows.end, rows.begin + (p - first_piece[size_t(index)]) * piece_rows);
    return Piece{p, index, RowRange{begin, std::min(rows.end, begin + piece_rows)}, rows};
  }
  // Calls f(segment, piece) for pieces [p0, p1), in order.
  template <typename RowsOf, typename F>
  void for_each(int64_t p0, int64_t p1, const RowsOf& rows_of, const F& f) const {
    int64_t index = int64_t(std::upper_bound(first_piece.begin(), first_piece.end(), p0) - first_piece.begin()) - 1;
    for (int64_t p = p0; p < p1; ++p) {
      const Piece piece_p = piece(p, index, rows_of);
      index = piece_p.index;
      f(segments[size_t(index)], piece_p);
    }
  }
};

// Calls body(s, part, rows) for every segment s in [0, S), with rows = rows_of(s) (a
// RowRange) and part = rows for a segment shorter than `shared_rows`, or each of the
// pieces of kSharedPieceRows rows that cover a longer one. Segments go to tasks
// segment_grain at a time; finish() ends each task (a streaming-store fence, say).
// The pieces of all long segments are shared out after the short segments are done.
template <typename RowsOf, typename Body, typename Finish>
void for_each_segment_part(const Runtime& rt, int64_t S, int64_t grain, int64_t shared_rows, const RowsOf& rows_of,
                           const Body& body, const Finish& finish) {
  const SegmentPieces pieces(for_each_short_segment(rt, S, grain, shared_rows, rows_of,
                                                    [&](int64_t s, RowRange rows) { body(s, rows, rows); }, finish),
                             rows_of);
  if (pieces.count() == 0) return;
  parallel_for(rt, 0, pieces.count(), 1, [&](int64_t p0, int64_t p1) {
    pieces.for_each(p0, p1, rows_of, [&](int64_t s, const SegmentPieces::Piece& piece) {
      body(s, piece.rows, piece.segment_rows);
    });
    finish();
  });
}

// ---- Narrow rows: per-word scalars or small vectors (rows of 2 to 32 bytes, say
// f32 D = 1 to 8) written to every row of their segment (expand, the sum/mean
// backward). Row by row, each word of 1-9 rows cost a mispredicted loop exit,
// more than its bytes: f32 D = 1 expand took 9.1 ms at T = 2^22 (words 1..9,
// bench_pooling's narrow-rows table), 1.1x index_select into a reused buffer;
// this way 2.2 ms, 2.4x. Here the output's rows are shared out in ranges, and a
// segment of at most kNarrowRunRows rows is written with one fixed run of 16-byte
// stores of its row repeated. The run may spill past the segment's end, into rows
// of later segments of the same range: the same thread writes those afterwards.
// Long segments need no special care: a range takes whatever part of a segment
// falls in it.

// Whether rows of row_bytes take this path.
inline bool narrow_rows(int64_t row_bytes) {
  return row_bytes == 2 || row_bytes == 4 || row_bytes == 8 || row_bytes == 16 || row_bytes == 32;
}

// Rows of one run: 16 (a run of 32 to 256 bytes), 8 for 32-byte rows.
template <size_t kRowBytes>
constexpr int64_t kNarrowRunRows = kRowBytes <= 16 ? 16 : int64_t(256 / kRowBytes);

// Output rows per parallel task.
constexpr int64_t kNarrowTaskRows = int64_t(1) << 16;

// Writes every row t of out [T rows of kRowBytes] with the row of its segment s,
// which row_of(s, row) puts into row[kRowBytes]. Requires valid offsets.
template <size_t kRowBytes, typename RowOf>
void fill_narrow_rows(const Runtime& rt, const int64_t* offsets, int64_t S, int64_t T, void* out,
                      const RowOf& row_of) {
  static_assert(kRowBytes % 2 == 0 && kRowBytes <= 32 && (kRowBytes & (kRowBytes - 1)) == 0,
                "a power of two from 2 to 32 bytes");
  constexpr int64_t kRun = kNarrowRunRows<kRowBytes>;
  parallel_for(rt, 0, T, kNarrowTaskRows, [&](int64_t r0, int64_t r1) {
    uint8_t* dst = static_cast<uint8_t*>(out);
    // the segment holding row r0: the last s with offsets[s] <= r0 (then offsets[s + 1] > r0)
    // (at least 0: offsets[0] > 0 would be offsets changed since they were checked)
    int64_t s = std::max<int64_t>(0, int64_t(std::upper_bound(offsets, offsets + S + 1, r0) - offsets) - 1);
    for (; s < S && offsets[s] < r1; ++s) {
      const int64_t begin = std::max(offsets[s], r0), end = std::min(offsets[s + 1], r1);
      if (end <= begin) continue;  // an empty segment
      alignas(16) uint8_t row[kRowBytes];
      row_of(s, row);
      uint8_t* p = dst + begin * int64_t(kRowBytes);
      if (end - begin <= kRun && begin + kRun <= r1) {
#if defined(__SSE2__)
        __m128i lanes[kRowBytes > 16 ? 2 : 1];  // 16 bytes of the run's repeating pattern
        if constexpr (kRowBytes >= 16) {
          for (size_t k = 0; k < kRowBytes / 16; ++k)
            lanes[k] = _mm_load_si128(reinterpret_cast<const __m128i*>(row) + k);
        } else {  // broadcast from a register (16 bytes stored piecewise and loaded back stall)
          uint64_t bits = 0;
          std::memcpy(&bits, row, kRowBytes);
          if constexpr (kRowBytes == 2) lanes[0] = _mm_set1_epi16(short(bits));
          else if constexpr (kRowBytes == 4) lanes[0] = _mm_set1_epi32(int(bits));
          else lanes[0] = _mm_set1_epi64x((long long)bits);
        }
        constexpr size_t kLanes = sizeof lanes / sizeof lanes[0];
        for (size_t i = 0; i < size_t(kRun) * kRowBytes / 16; ++i)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(p) + i, lanes[i % kLanes]);
#else
        for (int64_t k = 0; k < kRun; ++k) std::memcpy(p + k * int64_t(kRowBytes), row, kRowBytes);
#endif
      } else {
        for (int64_t t = begin; t < end; ++t, p += kRowBytes) std::memcpy(p, row, kRowBytes);
      }
    }
  });
}

// fill_narrow_rows for a row_bytes that narrow_rows accepts.
template <typename RowOf>
void fill_narrow_rows(const Runtime& rt, int64_t row_bytes, const int64_t* offsets, int64_t S, int64_t T,
                      void* out, const RowOf& row_of) {
  switch (row_bytes) {
    case 2: return fill_narrow_rows<2>(rt, offsets, S, T, out, row_of);
    case 4: return fill_narrow_rows<4>(rt, offsets, S, T, out, row_of);
    case 8: return fill_narrow_rows<8>(rt, offsets, S, T, out, row_of);
    case 16: return fill_narrow_rows<16>(rt, offsets, S, T, out, row_of);
    case 32: return fill_narrow_rows<32>(rt, offsets, S, T, out, row_of);
    default: break;
  }
}

}  // namespace pooling
}  // namespace tokcore
