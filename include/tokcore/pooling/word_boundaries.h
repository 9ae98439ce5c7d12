// word_boundaries: the byte-level rule that splits UTF-8 streams into words.
//
// Shared by the CPU kernel, the CUDA kernel and the C++ unit tests. The stream
// is cut into fixed chunks; a chunk's worker owns every word whose natural start
// lies in the chunk and walks it to its end (possibly past the chunk), emitting
// the word's start and its max_word_bytes cuts. Because words are contiguous and
// ordered, per-chunk counts plus an exclusive scan place every chunk's output
// without any cross-chunk state, and each byte is visited O(1) times.
#pragma once

#include <cstdint>

#include "tokcore/common/macros.h"

namespace tokcore {
namespace pooling {

enum class WordMode : int { kSpace = 0, kBytes = 1 };

enum ByteClass : int { kWhitespace = 0, kWordByte = 1, kPunct = 2 };

TOKCORE_HD constexpr int byte_class_rule(uint8_t b) {
  if (b == ' ' || (b >= '\t' && b <= '\r')) return kWhitespace;  // \t \n \v \f \r
  if ((b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || (b >= '0' && b <= '9') || b == '_' ||
      b >= 0x80)
    return kWordByte;
  return kPunct;
}

// The host classifies through a 256-entry table (1.15x faster than the branches
// on the CPU); the device evaluates the rule, which needs no memory.
struct ByteClassTable {
  uint8_t cls[256];
  constexpr ByteClassTable() : cls() {
    for (int b = 0; b < 256; ++b) cls[b] = uint8_t(byte_class_rule(uint8_t(b)));
  }
};
inline constexpr ByteClassTable kByteClassTable{};

TOKCORE_HD int byte_class(uint8_t b) {
#if defined(__CUDA_ARCH__)
  return byte_class_rule(b);
#else
  return kByteClassTable.cls[b];
#endif
}

// Whether a byte of class c starts a word after a byte of class p (same sequence).
TOKCORE_HD bool starts_word_class(int p, int c) {
  return (c == kWhitespace && p != kWhitespace) || (c == kWordByte && p == kPunct);
}

TOKCORE_HD bool starts_word(uint8_t prev, uint8_t cur) {
  return starts_word_class(byte_class(prev), byte_class(cur));
}

TOKCORE_HD bool is_utf8_char_start(uint8_t b) { return (b & 0xC0) != 0x80; }

// Where to cut a piece that starts at `start` and is longer than max_bytes: the
// last character start in (start, start + max_bytes], else start + max_bytes.
TOKCORE_HD int64_t cut_position(const uint8_t* bytes, int64_t start, int64_t max_bytes) {
  for (int64_t q = start + max_bytes; q > start; --q)
    if (is_utf8_char_start(bytes[q])) return q;
  return start + max_bytes;
}

// Index b of the sequence holding position pos: cu[b] <= pos < cu[b+1]
// (the last such b when empty sequences share the position). cu has B+1 entries.
TOKCORE_HD int64_t sequence_of(const int64_t* cu, int64_t B, int64_t pos) {
  int64_t lo = 0, hi = B;  // invariant: cu[lo] <= pos, answer in [lo, hi)
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= pos) lo = mid; else hi = mid;
  }
  return lo;
}

// Calls emit(p) for every word start p (in increasing order) of the words whose
// natural start lies in [lo, hi). Requires valid cu (cu[0] = 0, non-decreasing,
// cu[B] = total length) and lo < hi <= cu[B].
template <typename Emit>
TOKCORE_HD void for_each_word_start(const uint8_t* bytes, const int64_t* cu, int64_t B, int64_t lo,
                                    int64_t hi, int64_t max_bytes, WordMode mode, Emit&& emit) {
  if (mode == WordMode::kBytes) {
    for (int64_t p = lo; p < hi; ++p) emit(p);
    return;
  }
  int64_t b = sequence_of(cu, B, lo);
  int64_t p = lo;
  while (p < hi) {
    while (cu[b + 1] <= p) ++b;  // skip to the sequence holding p
    const int64_t seq_start = cu[b], seq_end = cu[b + 1];
    if (p != seq_start && !starts_word(bytes[p - 1], bytes[p])) {
      ++p;
      continue;
    }
    // p is a natural word start: find the word's end (carrying the previous
    // byte's class, so each byte is classified once), then cut it into pieces.
    int64_t word_end = p + 1;
    for (int prev_class = byte_class(bytes[p]); word_end < seq_end; ++word_end) {
      const int cur_class = byte_class(bytes[word_end]);
      if (starts_word_class(prev_class, cur_class)) break;
      prev_class = cur_class;
    }
    int64_t piece = p;
    emit(piece);
    while (word_end - piece > max_bytes) {
      piece = cut_position(bytes, piece, max_bytes);
      emit(piece);
    }
    p = word_end;
  }
}

// The word starts owned by chunk c (bytes [c * chunk_bytes, + chunk_bytes) of the
// flat stream): the body of the count and fill passes of word_boundaries, one
// chunk per CUDA thread. The CPU kernel finds the same starts 64 bytes at a time
// (csrc/pooling/pooling_cpu_words.h), tested against this walk.
template <typename Emit>
TOKCORE_HD void for_each_word_start_in_chunk(const uint8_t* bytes, const int64_t* cu, int64_t B,
                                             int64_t total_bytes, int64_t chunk_bytes, int64_t c,
                                             int64_t max_bytes, WordMode mode, Emit&& emit) {
  const int64_t lo = c * chunk_bytes;
  const int64_t hi = lo + chunk_bytes < total_bytes ? lo + chunk_bytes : total_bytes;
  for_each_word_start(bytes, cu, B, lo, hi, max_bytes, mode, emit);
}

// First index i in values[0, n) with values[i] >= key. The adapters use it for
// word_cu[b] = number of word starts < cu[b] (every non-empty sequence starts a word).
TOKCORE_HD int64_t lower_bound(const int64_t* values, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (values[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace pooling
}  // namespace tokcore
