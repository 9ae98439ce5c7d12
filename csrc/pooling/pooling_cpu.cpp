// CPU kernels of the pooling family: torch-free loops over the core's
// per-element logic, parallelized through the Runtime the adapter passes in.
// (The forward and backward reduce, built per instruction set, are in
// pooling_cpu_reduce.cpp; this file picks a variant at run time.)
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pooling_cpu_segments.h"
#include "pooling_cpu_words.h"
#include "pooling_kernels.h"
#include "tokcore/common/cpu_isa.h"
#include "tokcore/common/streaming_stores.h"

namespace tokcore {
namespace pooling {

int64_t word_boundaries_count_cpu(const Runtime& rt, const uint8_t* bytes, const int64_t* cu,
                                  int64_t B, int64_t max_bytes, WordMode mode,
                                  int64_t* chunk_counts) {
  const int64_t total_bytes = cu[B];
  const int64_t chunks = num_word_chunks(total_bytes, kWordChunkBytesCpu);
  parallel_for(rt, 0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t n = 0;
      for_each_word_start_in_chunk_cpu(bytes, cu, B, total_bytes, kWordChunkBytesCpu, c, max_bytes, mode,
                                       [&](int64_t) { ++n; });
      chunk_counts[c] = n;
    }
  });
  int64_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += chunk_counts[c];
  return total;
}

bool word_boundaries_fill_cpu(const Runtime& rt, const uint8_t* bytes, const int64_t* cu, int64_t B,
                              int64_t max_bytes, WordMode mode, int64_t* chunk_counts,
                              int64_t num_words, int64_t* word_offsets, int64_t* word_cu) {
  const int64_t total_bytes = cu[B];
  const int64_t chunks = num_word_chunks(total_bytes, kWordChunkBytesCpu);
  int64_t running = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n = chunk_counts[c];
    chunk_counts[c] = running;
    running += n;
  }
  // Each chunk writes only into the slots its count gave it: bytes that another
  // thread changes between the passes may hold more words now (a data race of the
  // caller's, which must not become a write past the output).
  std::atomic<bool> counts_hold{true};
  parallel_for(rt, 0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* out = word_offsets + chunk_counts[c];
      int64_t* const end = word_offsets + (c + 1 < chunks ? chunk_counts[c + 1] : num_words);
      bool overflow = false;
      for_each_word_start_in_chunk_cpu(bytes, cu, B, total_bytes, kWordChunkBytesCpu, c, max_bytes, mode,
                                       [&](int64_t p) {
                                         if (out < end) *out++ = p;
                                         else overflow = true;
                                       });
      if (overflow || out != end) counts_hold.store(false, std::memory_order_relaxed);
    }
  });
  if (!counts_hold.load()) return false;
  word_offsets[num_words] = total_bytes;
  // word_cu[b] = the number of word starts before cu[b]: one binary search per range
  // of sequences, then a merge of the two sorted lists (a binary search per sequence,
  // serially, made 10M one-byte sequences run at 26 MB/s)
  parallel_for(rt, 0, B + 1, 1 << 14, [&](int64_t b0, int64_t b1) {
    int64_t w = lower_bound(word_offsets, num_words, cu[b0]);
    for (int64_t b = b0; b < b1; ++b) {
      while (w < num_words && word_offsets[w] < cu[b]) ++w;
      word_cu[b] = w;
    }
  });
  return true;
}

#if defined(TOKCORE_HAVE_X86_ISA_KERNELS)
namespace {
// The variant that reduces rows of D features of dtype: the one TOKCORE_CPU_ISA
// names, else the best fit for the row (isa_for_row, tokcore/common/cpu_isa.h).
CpuIsa reduce_isa(DType dtype, int64_t D) {
  if (cpu_isa_forced()) return cpu_isa();
  const int64_t lanes[3] = {isa_base::vector_features(dtype), isa_avx2::vector_features(dtype),
                            isa_avx512::vector_features(dtype)};
  return isa_for_row(cpu_isa(), D, lanes);
}

// reduce_isa, except for rows of 1, 2, 4 or 8 features and at most 16 bytes
// (reduces_narrow_rows): the AVX-512 forward reduces them 16 words at a time, and
// their max/min backward 16 elements of a word at a time, faster than any variant
// that goes row by row, whatever its vectors' fit.
CpuIsa narrow_rows_or_reduce_isa(DType dtype, int64_t D) {
  if (cpu_isa() == CpuIsa::kAvx512 && isa_avx512::reduces_narrow_rows(dtype, D)) return CpuIsa::kAvx512;
  return reduce_isa(dtype, D);
}
}  // namespace
#endif

void segment_reduce_cpu(const Runtime& rt, DType dtype, const void* x, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, Reduce reduce, void* y) {
  // The forward and backward reduce are the CPU kernels whose speed is
  // arithmetic-bound: built per instruction set (pooling_cpu_reduce.cpp), picked here.
#if defined(TOKCORE_HAVE_X86_ISA_KERNELS)
  switch (narrow_rows_or_reduce_isa(dtype, D)) {
    case CpuIsa::kAvx512: return isa_avx512::segment_reduce_cpu(rt, dtype, x, offsets, S, T, D, reduce, y);
    case CpuIsa::kAvx2: return isa_avx2::segment_reduce_cpu(rt, dtype, x, offsets, S, T, D, reduce, y);
    case CpuIsa::kBase: break;
  }
#endif
  isa_base::segment_reduce_cpu(rt, dtype, x, offsets, S, T, D, reduce, y);
}

void segment_reduce_backward_cpu(const Runtime& rt, DType dtype, const void* grad_y, const void* x,
                                 const void* y, const int64_t* offsets, int64_t S, int64_t T,
                                 int64_t D, Reduce reduce, void* grad_x) {
  // Built per instruction set too (pooling_cpu_reduce.cpp), and picked alike (the
  // sum/mean backward writes rows, with nothing to reduce: by the row's fit only).
#if defined(TOKCORE_HAVE_X86_ISA_KERNELS)
  const bool max_min = reduce == Reduce::kMax || reduce == Reduce::kMin;
  switch (max_min ? narrow_rows_or_reduce_isa(dtype, D) : reduce_isa(dtype, D)) {
    case CpuIsa::kAvx512:
      return isa_avx512::segment_reduce_backward_cpu(rt, dtype, grad_y, x, y, offsets, S, T, D, reduce, grad_x);
    case CpuIsa::kAvx2:
      return isa_avx2::segment_reduce_backward_cpu(rt, dtype, grad_y, x, y, offsets, S, T, D, reduce, grad_x);
    case CpuIsa::kBase: break;
  }
#endif
  isa_base::segment_reduce_backward_cpu(rt, dtype, grad_y, x, y, offsets, S, T, D, reduce, grad_x);
}

void segment_expand_cpu(const Runtime& rt, DType dtype, const void* y, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, void* x) {
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    const V* src = static_cast<const V*>(y);
    V* dst = static_cast<V*>(x);
    const int64_t row_bytes = D * int64_t(sizeof(V));
    if (narrow_rows(row_bytes))
      return fill_narrow_rows(rt, row_bytes, offsets, S, T, dst,
                              [&](int64_t s, uint8_t* row) { std::memcpy(row, src + s * D, size_t(row_bytes)); });
    const RowWriter writer{use_streaming_stores(dst, T * row_bytes, row_bytes)};
    for_each_segment_part(
        rt, S, segment_grain(S, T, D), shared_segment_rows(rt.threads, T),
        [&](int64_t s) { return segment_rows(offsets, s, T); },
        [&](int64_t s, RowRange part, RowRange) {
          for (int64_t t = part.begin; t < part.end; ++t) writer.copy(dst + t * D, src + s * D, size_t(row_bytes));
        },
        [&] { writer.finish(); });
  });
}

void segment_pack_cpu(const Runtime& rt, DType dtype, const void* x, const int64_t* offsets,
                      int64_t S, int64_t T, int64_t D, int64_t max_len, void* packed) {
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    const V* src = static_cast<const V*>(x);
    V* dst = static_cast<V*>(packed);
    const size_t row_bytes = sizeof(V) * size_t(D);
    const RowWriter writer{use_streaming_stores(dst, S * max_len * int64_t(row_bytes), int64_t(row_bytes))};
    // The parts are of packed rows [0, max_len): the first `kept` are copied, the rest zeroed.
    for_each_segment_part(
        rt, S, segment_grain(S, S * max_len, D), shared_segment_rows(rt.threads, S * max_len),
        [&](int64_t) { return RowRange{0, max_len}; },
        [&](int64_t s, RowRange part, RowRange) {
          const RowRange rows = segment_rows(offsets, s, T);
          const int64_t kept = std::min(rows.end - rows.begin, max_len);
          const int64_t copy_end = std::clamp(kept, part.begin, part.end);
          V* out = dst + s * max_len * D;
          if (copy_end > part.begin)
            writer.copy(out + part.begin * D, src + (rows.begin + part.begin) * D, row_bytes * size_t(copy_end - part.begin));
          writer.zero(out + copy_end * D, row_bytes * size_t(part.end - copy_end));
        },
        [&] { writer.finish(); });
  });
}

void segment_unpack_cpu(const Runtime& rt, DType dtype, const void* packed, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, int64_t max_len, void* x) {
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    const V* src = static_cast<const V*>(packed);
    V* dst = static_cast<V*>(x);
    const size_t row_bytes = sizeof(V) * size_t(D);
    // Not streamed: each word is one block of several rows here, and memcpy of
    // such blocks measured as fast or faster (streaming stores 0.88-0.99x of it,
    // T = 2^20, D = 256, max_len 8; bench_pooling's streaming table keeps it as
    // the control).
    const RowWriter writer{false};
    for_each_segment_part(
        rt, S, segment_grain(S, T, D), shared_segment_rows(rt.threads, T),
        [&](int64_t s) { return segment_rows(offsets, s, T); },
        [&](int64_t s, RowRange part, RowRange rows) {  // the segment's first max_len rows copied, the rest zeroed
          const int64_t copy_end = std::clamp(rows.begin + std::min(rows.end - rows.begin, max_len), part.begin,
                                              part.end);
          if (copy_end > part.begin)
            writer.copy(dst + part.begin * D, src + (s * max_len + part.begin - rows.begin) * D,
                        row_bytes * size_t(copy_end - part.begin));
          writer.zero(dst + copy_end * D, row_bytes * size_t(part.end - copy_end));
        },
        [&] { writer.finish(); });
  });
}

}  // namespace pooling
}  // namespace tokcore
