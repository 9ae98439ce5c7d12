// Torch-free entry points of the pooling kernels (CPU in pooling_cpu.cpp, CUDA in
// pooling_cuda.cu). Pointers are raw, sizes explicit, buffers contiguous; the
// torch adapter pooling_ops.cpp checks arguments and allocates outputs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "tokcore/common/dtype.h"
#include "tokcore/common/offsets.h"
#include "tokcore/common/parallel.h"
#include "tokcore/pooling/segment.h"
#include "tokcore/pooling/word_boundaries.h"

namespace tokcore {
namespace pooling {

// Bytes per work item of word_boundaries: a chunk's worker owns the words whose
// natural start lies in it.
constexpr int64_t kWordChunkBytesCpu = 1 << 16;
constexpr int64_t kWordChunkBytesCuda = 256;

inline int64_t num_word_chunks(int64_t total_bytes, int64_t chunk_bytes) {
  return (total_bytes + chunk_bytes - 1) / chunk_bytes;
}

// ---- CPU ----
// Segments per parallel task so that each task touches at least ~64K elements.
inline int64_t segment_grain(int64_t S, int64_t T, int64_t D) {
  const int64_t per_segment = std::max<int64_t>(1, (T / std::max<int64_t>(S, 1)) * D);
  return std::max<int64_t>(1, (int64_t(1) << 16) / per_segment);
}

// Pass 1: chunk_counts[c] = number of words owned by chunk c; returns the total.
int64_t word_boundaries_count_cpu(const Runtime& rt, const uint8_t* bytes, const int64_t* cu,
                                  int64_t B, int64_t max_bytes, WordMode mode,
                                  int64_t* chunk_counts);
// Pass 2: chunk_counts becomes exclusive offsets; fills word_offsets [W+1] and word_cu [B+1].
// False (outputs unspecified, nothing written past them) when a chunk finds another
// number of words than pass 1 did: the bytes changed in between.
bool word_boundaries_fill_cpu(const Runtime& rt, const uint8_t* bytes, const int64_t* cu, int64_t B,
                              int64_t max_bytes, WordMode mode, int64_t* chunk_counts,
                              int64_t num_words, int64_t* word_offsets, int64_t* word_cu);

void segment_reduce_cpu(const Runtime& rt, DType dtype, const void* x, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, Reduce reduce, void* y);
// The forward and backward reduce, built per instruction set
// (pooling_cpu_reduce.cpp); the two functions above and below pick one at run
// time (tokcore/common/cpu_isa.h).
#define TOKCORE_POOLING_CPU_ISA_KERNELS                                                           \
  /* features per vector load of dtype in this build (0: lane by lane) */                         \
  int64_t vector_features(DType dtype);                                                           \
  /* whether this build reduces rows of D features 16 words at a time (and their max/min */       \
  /* backward 16 elements of a word at a time) */                                                 \
  bool reduces_narrow_rows(DType dtype, int64_t D);                                               \
  void segment_reduce_cpu(const Runtime& rt, DType dtype, const void* x, const int64_t* offsets,  \
                          int64_t S, int64_t T, int64_t D, Reduce reduce, void* y);               \
  void segment_reduce_backward_cpu(const Runtime& rt, DType dtype, const void* grad_y,            \
                                   const void* x, const void* y, const int64_t* offsets,          \
                                   int64_t S, int64_t T, int64_t D, Reduce reduce, void* grad_x);
namespace isa_base { TOKCORE_POOLING_CPU_ISA_KERNELS }
namespace isa_avx2 { TOKCORE_POOLING_CPU_ISA_KERNELS }
namespace isa_avx512 { TOKCORE_POOLING_CPU_ISA_KERNELS }
#undef TOKCORE_POOLING_CPU_ISA_KERNELS

void segment_reduce_backward_cpu(const Runtime& rt, DType dtype, const void* grad_y, const void* x,
                                 const void* y, const int64_t* offsets, int64_t S, int64_t T,
                                 int64_t D, Reduce reduce, void* grad_x);
void segment_expand_cpu(const Runtime& rt, DType dtype, const void* y, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, void* x);
void segment_pack_cpu(const Runtime& rt, DType dtype, const void* x, const int64_t* offsets,
                      int64_t S, int64_t T, int64_t D, int64_t max_len, void* packed);
void segment_unpack_cpu(const Runtime& rt, DType dtype, const void* packed, const int64_t* offsets,
                        int64_t S, int64_t T, int64_t D, int64_t max_len, void* x);

// ---- CUDA (stream is a cudaStream_t; every call returns a cudaError_t as int) ----
// Workspace bytes that word_boundaries_cuda needs for B sequences of total_bytes.
size_t word_boundaries_workspace_cuda(int64_t total_bytes);
// Pass 1 (synchronizes: the number of words decides the output size):
// *num_words = W. workspace holds the per-chunk offsets for pass 2.
int word_boundaries_count_cuda(const uint8_t* bytes, const int64_t* cu, int64_t B,
                               int64_t total_bytes, int64_t max_bytes, WordMode mode,
                               void* workspace, size_t workspace_bytes, int64_t* num_words,
                               void* stream);
int word_boundaries_fill_cuda(const uint8_t* bytes, const int64_t* cu, int64_t B,
                              int64_t total_bytes, int64_t max_bytes, WordMode mode,
                              const void* workspace, int64_t num_words, int64_t* word_offsets,
                              int64_t* word_cu, void* stream);

// Workspace bytes that segment_reduce_cuda needs: 0 unless it reduces long
// segments in blocks (reduce_blocks_from_rows, tokcore/pooling/segment_threads.h).
// longest: the most rows of any segment (from the offsets check), or < 0 if not
// known; the same value must be passed to both.
size_t segment_reduce_workspace_cuda(DType dtype, int64_t S, int64_t T, int64_t D, int64_t longest);
int segment_reduce_cuda(DType dtype, const void* x, const int64_t* offsets, int64_t S, int64_t T,
                        int64_t D, Reduce reduce, int64_t longest, void* workspace, size_t workspace_bytes,
                        void* y, void* stream);
// Workspace bytes that segment_reduce_backward_cuda needs: 0 unless a max/min
// backward runs in two passes (max_min_backward_in_parts, segment_threads.h).
size_t segment_reduce_backward_workspace_cuda(DType dtype, int64_t S, int64_t T, int64_t D, Reduce reduce);
int segment_reduce_backward_cuda(DType dtype, const void* grad_y, const void* x, const void* y,
                                 const int64_t* offsets, int64_t S, int64_t T, int64_t D,
                                 Reduce reduce, void* workspace, size_t workspace_bytes, void* grad_x,
                                 void* stream);
int segment_expand_cuda(DType dtype, const void* y, const int64_t* offsets, int64_t S, int64_t T,
                        int64_t D, void* x, void* stream);
int segment_pack_cuda(DType dtype, const void* x, const int64_t* offsets, int64_t S, int64_t T,
                      int64_t D, int64_t max_len, void* packed, void* stream);
int segment_unpack_cuda(DType dtype, const void* packed, const int64_t* offsets, int64_t S,
                        int64_t T, int64_t D, int64_t max_len, void* x, void* stream);

}  // namespace pooling
}  // namespace tokcore
