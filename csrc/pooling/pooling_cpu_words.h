// word_boundaries on the CPU, 64 bytes at a time: the same words as the core's
// for_each_word_start_in_chunk (tokcore/pooling/word_boundaries.h), which the
// CUDA kernel runs and the tests compare against, but found with bit masks.
//
// For a block of 64 bytes, bit i of `ws` / `word` says whether byte i is
// whitespace / a word byte (punctuation is neither). The rule "a word starts at a
// whitespace byte after a non-whitespace byte, and at a word byte after a
// punctuation byte" is then three shifts and four logic operations on 64 bytes,
// plus the bits of the sequence starts; set bits are walked with ctz. Long words
// are cut exactly as in the core (cut_position).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>  // SSE2: in every x86-64 CPU
#endif

#include "tokcore/pooling/word_boundaries.h"

namespace tokcore {
namespace pooling {

struct ByteClassMasks {
  uint64_t ws, word;
};

// Classes of bytes p[0, n), n <= 64; bits at and above n are 0.
inline ByteClassMasks classify_block(const uint8_t* p, int n) {
  ByteClassMasks m{0, 0};
#if defined(__x86_64__) || defined(_M_X64)
  if (n == 64) {
    for (int k = 0; k < 4; ++k) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
      // unsigned "x <= limit" as min(x, limit) == x
      auto at_most = [](__m128i x, int limit) {
        return _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(char(limit))), x);
      };
      const __m128i space = _mm_cmpeq_epi8(b, _mm_set1_epi8(' '));
      const __m128i controls = at_most(_mm_sub_epi8(b, _mm_set1_epi8('\t')), '\r' - '\t');
      const __m128i letter =
          at_most(_mm_sub_epi8(_mm_or_si128(b, _mm_set1_epi8(0x20)), _mm_set1_epi8('a')), 'z' - 'a');
      const __m128i digit = at_most(_mm_sub_epi8(b, _mm_set1_epi8('0')), 9);
      const __m128i underscore = _mm_cmpeq_epi8(b, _mm_set1_epi8('_'));
      const uint64_t ws = uint16_t(_mm_movemask_epi8(_mm_or_si128(space, controls)));
      const uint64_t word =
          uint16_t(_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(letter, digit), underscore)) |
                   _mm_movemask_epi8(b));  // the sign bit: bytes >= 0x80
      m.ws |= ws << (16 * k);
      m.word |= word << (16 * k);
    }
    return m;
  }
#endif
  for (int i = 0; i < n; ++i) {
    const int c = byte_class(p[i]);
    m.ws |= uint64_t(c == kWhitespace) << i;
    m.word |= uint64_t(c == kWordByte) << i;
  }
  return m;
}

// Calls emit(p) for every word start p, in increasing order, of the words whose
// natural start lies in chunk c (bytes [c * chunk_bytes, + chunk_bytes)): the
// same calls as for_each_word_start_in_chunk. Requires valid cu.
template <typename Emit>
void for_each_word_start_in_chunk_cpu(const uint8_t* bytes, const int64_t* cu, int64_t B,
                                      int64_t total_bytes, int64_t chunk_bytes, int64_t c,
                                      int64_t max_bytes, WordMode mode, Emit&& emit) {
  const int64_t lo = c * chunk_bytes;
  const int64_t hi = lo + chunk_bytes < total_bytes ? lo + chunk_bytes : total_bytes;
  if (mode == WordMode::kBytes) {
    for (int64_t p = lo; p < hi; ++p) emit(p);
    return;
  }
  // The word [start, end) found last: its start is emitted, its cuts wait for its end.
  int64_t open = -1;
  auto close = [&](int64_t end) {
    for (int64_t piece = open; end - piece > max_bytes;) {
      piece = cut_position(bytes, piece, max_bytes);
      emit(piece);
    }
  };
  int64_t next_seq = sequence_of(cu, B, lo);  // cu[next_seq] <= lo: check it first
  for (int64_t q = lo; q < total_bytes; q += 64) {
    // Past the chunk, only the end of its last word is looked for. A chunk without a
    // word start owns nothing: without this return it walked on to the next start,
    // so every chunk inside one long word walked to that word's end, quadratic in
    // the word (100 MB of one unbroken ACGT sequence took 10.9 s, now 36 ms).
    if (q >= hi && open < 0) return;
    const int n = int(total_bytes - q < 64 ? total_bytes - q : 64);
    const uint64_t valid = n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
    const ByteClassMasks m = classify_block(bytes + q, n);
    const uint64_t punct = ~(m.ws | m.word) & valid;
    const int prev = q > 0 ? byte_class(bytes[q - 1]) : kWhitespace;
    const uint64_t ws_before = (m.ws << 1) | uint64_t(prev == kWhitespace);
    const uint64_t punct_before = (punct << 1) | uint64_t(prev == kPunct);
    uint64_t starts = (m.ws & ~ws_before) | (m.word & punct_before);
    // Every sequence start is a word start (the rule's previous byte belongs to
    // another sequence there, so it does not matter what the rule says).
    for (; next_seq < B && cu[next_seq] < q + n; ++next_seq)
      if (cu[next_seq] >= q) starts |= uint64_t(1) << (cu[next_seq] - q);
    starts &= valid;
    while (starts != 0) {
      const int64_t s = q + __builtin_ctzll(starts);
      starts &= starts - 1;
      if (open >= 0) close(s);
      if (s >= hi) return;  // the chunk's last word is closed
      emit(s);
      open = s;
    }
  }
  if (open >= 0) close(total_bytes);
}

}  // namespace pooling
}  // namespace tokcore
