// Streaming (non-temporal) stores for CPU kernels with large outputs. A normal
// store first reads the cache line it writes into (read for ownership); a
// streaming store sends whole lines to memory without that read. For an output
// far larger than the caches, which the next op will read from memory anyway,
// that removes up to a third of the memory traffic of a copy. Measured on the
// 2-core VM (T = 2^20, D = 256, f32 / bf16, streamed against plain stores, calls
// taking turns; the CPU streaming table of bench/bench_pooling.py): mean backward
// 2.6x / 2.0x faster, segment_expand 1.46x / 1.54x, segment_pack 1.44x / 1.59x,
// forward reduce 1.06x / 1.09x.
//
// Used when the output is at least TOKCORE_CPU_STREAM_MIN_MB (default 64; 0: any
// size), starts on a cache line and its rows are whole cache lines apart, so only
// whole lines are streamed. x86-64 only (SSE2, its baseline); elsewhere memcpy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace tokcore {

constexpr int64_t kCacheLineBytes = 64;

// Whether an output of output_bytes at out, written row by row with rows
// row_bytes apart, should be written with streaming stores: at least
// TOKCORE_CPU_STREAM_MIN_MB (read at import or tokcore.reload_settings(), so tests
// can cover both paths), on a cache line, whole lines apart. Not inline: the
// per-instruction-set kernels call it, and an inline copy compiled with AVX-512
// could be the one the linker keeps for the baseline kernels too
// (scripts/check_isa_objects.sh); it is defined in csrc/common/streaming_stores.cpp.
bool use_streaming_stores(const void* out, int64_t output_bytes, int64_t row_bytes);

// Orders this thread's streaming stores before its later stores (they are
// weakly ordered); call once at the end of each thread's share of the work.
inline void fence_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Writes one vector of kBytes bytes from v to p: with a streaming store when
// kStream and the build has one of that width (p then aligned to kBytes), else
// with memcpy. The per-ISA kernels store their vector registers through this.
template <bool kStream, size_t kBytes>
inline void store_vector(void* p, const void* v) {
  if constexpr (kStream) {
#if defined(__AVX512F__)
    if constexpr (kBytes == 64) {
      __m512i r;
      std::memcpy(&r, v, kBytes);
      _mm512_stream_si512(static_cast<__m512i*>(p), r);
      return;
    }
#endif
#if defined(__AVX__)
    if constexpr (kBytes == 32) {
      __m256i r;
      std::memcpy(&r, v, kBytes);
      _mm256_stream_si256(static_cast<__m256i*>(p), r);
      return;
    }
#endif
#if defined(__SSE2__)
    if constexpr (kBytes == 16) {
      __m128i r;
      std::memcpy(&r, v, kBytes);
      _mm_stream_si128(static_cast<__m128i*>(p), r);
      return;
    }
#endif
  }
  std::memcpy(p, v, kBytes);
}

// Writes rows of an output: with streaming stores when `stream` (dst must then be
// 16-byte aligned and bytes a multiple of 16, as use_streaming_stores ensures),
// with memcpy/memset otherwise.
struct RowWriter {
  bool stream = false;

  void copy(void* dst, const void* src, size_t bytes) const {
    // Rows of a few bytes (D = 1 to 4): a copy of a size known here is a move or two;
    // a memcpy call per row cost more than its data (f32 D = 1: expand ran at 0.36x
    // index_select, the mean backward at 0.5x its torch form, before both moved to
    // fill_narrow_rows; pack and unpack still copy such rows here). Such rows never stream.
    switch (bytes) {
      case 2: std::memcpy(dst, src, 2); return;
      case 4: std::memcpy(dst, src, 4); return;
      case 8: std::memcpy(dst, src, 8); return;
      case 16: std::memcpy(dst, src, 16); return;
      default: break;
    }
#if defined(__SSE2__)
    if (stream) {
      auto* d = static_cast<__m128i*>(dst);
      const auto* s = static_cast<const __m128i*>(src);
      const size_t n = bytes / 16;
      size_t i = 0;
      for (; i + 4 <= n; i += 4) {  // four loads in flight, then four stores
        const __m128i a = _mm_loadu_si128(s + i), b = _mm_loadu_si128(s + i + 1);
        const __m128i c = _mm_loadu_si128(s + i + 2), e = _mm_loadu_si128(s + i + 3);
        _mm_stream_si128(d + i, a);
        _mm_stream_si128(d + i + 1, b);
        _mm_stream_si128(d + i + 2, c);
        _mm_stream_si128(d + i + 3, e);
      }
      for (; i < n; ++i) _mm_stream_si128(d + i, _mm_loadu_si128(s + i));
      if (bytes % 16 != 0) std::memcpy(d + n, s + n, bytes % 16);
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }

  void zero(void* dst, size_t bytes) const {
#if defined(__SSE2__)
    if (stream) {
      auto* d = static_cast<__m128i*>(dst);
      const size_t n = bytes / 16;
      for (size_t i = 0; i < n; ++i) _mm_stream_si128(d + i, _mm_setzero_si128());
      if (bytes % 16 != 0) std::memset(d + n, 0, bytes % 16);
      return;
    }
#endif
    if (bytes > 0) std::memset(dst, 0, bytes);  // (dst may be null when bytes is 0)
  }

  void finish() const {
    if (stream) fence_streaming_stores();
  }
};

}  // namespace tokcore
