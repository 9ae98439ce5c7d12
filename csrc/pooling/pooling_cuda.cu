// CUDA kernels of the pooling family. Torch-free: only the core headers and the
// CUDA toolkit (CUB for the scans), so this file compiles in seconds.
//
// Segment kernels use one thread per (segment, vector of features), and the
// row-writing ones one per row part of that too when segments are long; the reduce
// forward takes long segments in blocks of rows (a thread per block, then one per
// segment), and the max/min backward of a few long ones runs in two passes over
// row parts. The thread bodies are in tokcore/pooling/segment_threads.h, where the
// host tests run them too. No host sync, and no atomics but a min of row indices
// in the max/min backward's two passes, which does not depend on the order:
// results are deterministic (for valid offsets: unchecked invalid ones can make
// segments overlap, and then two threads write the same row).
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cub/device/device_scan.cuh>

#include "pooling_kernels.h"
#include "tokcore/pooling/segment_threads.h"

namespace tokcore {
namespace pooling {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

// ---------------------------------------------------------------- word_boundaries

__global__ void word_count_kernel(const uint8_t* bytes, const int64_t* cu, int64_t B,
                                  int64_t total_bytes, int64_t max_bytes, WordMode mode,
                                  int64_t chunks, int64_t* counts) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c > chunks) return;
  int64_t n = 0;
  if (c < chunks)
    for_each_word_start_in_chunk(bytes, cu, B, total_bytes, kWordChunkBytesCuda, c, max_bytes, mode,
                                 [&](int64_t) { ++n; });
  counts[c] = n;  // counts[chunks] = 0, so the exclusive scan's last entry is the total
}

__global__ void word_fill_kernel(const uint8_t* bytes, const int64_t* cu, int64_t B,
                                 int64_t total_bytes, int64_t max_bytes, WordMode mode,
                                 int64_t chunks, const int64_t* chunk_offsets,
                                 int64_t* word_offsets) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= chunks) return;
  int64_t* out = word_offsets + chunk_offsets[c];
  // only into this chunk's slots (chunk_offsets has chunks + 1 entries): bytes changed
  // since the count (by another stream) must not make it write past the output
  int64_t* const end = word_offsets + chunk_offsets[c + 1];
  for_each_word_start_in_chunk(bytes, cu, B, total_bytes, kWordChunkBytesCuda, c, max_bytes, mode,
                               [&](int64_t p) {
                                 if (out < end) *out++ = p;
                               });
}

__global__ void word_cu_kernel(const int64_t* cu, int64_t B, int64_t total_bytes,
                               int64_t num_words, int64_t* word_offsets, int64_t* word_cu) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b > B) return;
  word_cu[b] = lower_bound(word_offsets, num_words, cu[b]);
  if (b == 0) word_offsets[num_words] = total_bytes;
}

// Workspace of the reduce in blocks: block counts and their exclusive scan
// (block_begin), CUB's scan storage, and the blocks' results.
struct ReduceWorkspace {
  int64_t blocks_from_rows;  // reduce_blocks_from_rows: the segments taken in blocks
  int64_t blocks_bound;      // reduce_blocks_bound: the rows of partials
  int64_t* counts;       // [S + 1]
  int64_t* block_begin;  // [S + 1]
  void* scan_temp;
  size_t scan_bytes;
  void* partials;        // [blocks_bound, D] of the accumulator type
  size_t total_bytes;
};

struct WordWorkspace {
  int64_t* counts;   // [chunks + 1]
  int64_t* offsets;  // [chunks + 1], exclusive scan of counts
  void* scan_temp;
  size_t scan_bytes;
};

size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

WordWorkspace word_workspace(void* base, int64_t chunks) {
  WordWorkspace ws{};
  const size_t array_bytes = align_up(sizeof(int64_t) * size_t(chunks + 1));
  ws.counts = static_cast<int64_t*>(base);
  ws.offsets = base ? reinterpret_cast<int64_t*>(static_cast<char*>(base) + array_bytes) : nullptr;
  ws.scan_temp = base ? static_cast<char*>(base) + 2 * array_bytes : nullptr;
  cub::DeviceScan::ExclusiveSum(nullptr, ws.scan_bytes, ws.counts, ws.offsets, chunks + 1);
  return ws;
}

// ---------------------------------------------------------------- segment kernels

// Each kernel runs its per-thread body (tokcore/pooling/segment_threads.h) for
// thread i < S * D / N.
inline __device__ int64_t global_thread() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }

template <typename T, int N, Reduce R>
__global__ void segment_reduce_kernel(const T* __restrict__ x, const int64_t* __restrict__ offsets,
                                      int64_t S, int64_t rows_total, int64_t D, int64_t blocks_from_rows,
                                      T* __restrict__ y) {
  const int64_t i = global_thread();
  if (i < S * (D / N)) segment_reduce_thread<T, N, R>(i, x, offsets, rows_total, D, blocks_from_rows, y);
}

// The reduce forward in blocks (segment_threads.h): block counts, then pass 2 over
// blocks_bound * D / N threads, then pass 3 over S * D / N threads.
__global__ void segment_block_count_kernel(const int64_t* __restrict__ offsets, int64_t S,
                                           int64_t rows_total, int64_t blocks_from_rows,
                                           int64_t* __restrict__ counts) {
  const int64_t s = global_thread();
  if (s <= S) counts[s] = s < S ? segment_blocks_in_pass(offsets, s, rows_total, blocks_from_rows) : 0;
}

template <typename T, int N, Reduce R>
__global__ void segment_reduce_block_kernel(const T* __restrict__ x, const int64_t* __restrict__ offsets,
                                            const int64_t* __restrict__ block_begin, int64_t S,
                                            int64_t rows_total, int64_t D, int64_t blocks_bound,
                                            acc_t<T>* __restrict__ partials) {
  const int64_t g = global_thread();
  if (g < blocks_bound * (D / N))
    segment_reduce_block_thread<T, N, R>(g, x, offsets, block_begin, S, rows_total, D, partials);
}

template <typename T, int N, Reduce R>
__global__ void segment_reduce_combine_kernel(const acc_t<T>* __restrict__ partials,
                                              const int64_t* __restrict__ offsets,
                                              const int64_t* __restrict__ block_begin, int64_t S,
                                              int64_t blocks_bound, int64_t rows_total, int64_t D,
                                              int64_t blocks_from_rows, T* __restrict__ y) {
  const int64_t i = global_thread();
  if (i < S * (D / N))
    segment_reduce_combine_thread<T, N, R>(i, partials, offsets, block_begin, blocks_bound, rows_total, D,
                                           blocks_from_rows, y);
}

// The row-writing kernels run over S * D / N * parts threads (row_parts): this
// thread's segment thread and row part, or false for a thread past the end.
template <int N>
__device__ bool launch_part_thread(int64_t S, int64_t D, int64_t parts, PartThread& th) {
  const int64_t per_part = S * (D / N);
  const int64_t g = global_thread();
  if (g >= per_part * parts) return false;
  th = part_thread(g, per_part, parts);
  return true;
}

template <typename T, int N, Reduce R>
__global__ void segment_reduce_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                               const T* __restrict__ y,
                                               const int64_t* __restrict__ offsets, int64_t S,
                                               int64_t rows_total, int64_t D, int64_t parts,
                                               T* __restrict__ grad_x) {
  PartThread th;
  if (!launch_part_thread<N>(S, D, parts, th)) return;
  segment_reduce_backward_thread<T, N, R>(th.i, th.part, parts, grad_y, x, y, offsets, rows_total, D,
                                          grad_x);
}

// The max/min backward in two passes (segment_threads.h), over the same threads.
template <typename T, int N>
__global__ void max_min_first_rows_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                          const int64_t* __restrict__ offsets, int64_t S, int64_t rows_total,
                                          int64_t D, int64_t parts, int64_t* __restrict__ first_row) {
  PartThread th;
  if (!launch_part_thread<N>(S, D, parts, th)) return;
  // rows are >= 0 and kNoRow is positive: the unsigned min is the signed one
  max_min_first_rows_thread<T, N>(th.i, th.part, parts, x, y, offsets, rows_total, D,
                                  [&](int64_t index, int64_t row) {
    atomicMin(reinterpret_cast<unsigned long long*>(first_row + index), static_cast<unsigned long long>(row));
  });
}

template <typename T, int N>
__global__ void max_min_write_rows_kernel(const T* __restrict__ grad_y, const int64_t* __restrict__ first_row,
                                          const int64_t* __restrict__ offsets, int64_t S, int64_t rows_total,
                                          int64_t D, int64_t parts, T* __restrict__ grad_x) {
  PartThread th;
  if (!launch_part_thread<N>(S, D, parts, th)) return;
  max_min_write_rows_thread<T, N>(th.i, th.part, parts, grad_y, first_row, offsets, rows_total, D, grad_x);
}

template <typename T, int N>
__global__ void segment_expand_kernel(const T* __restrict__ y, const int64_t* __restrict__ offsets,
                                      int64_t S, int64_t rows_total, int64_t D, int64_t parts,
                                      T* __restrict__ x) {
  PartThread th;
  if (!launch_part_thread<N>(S, D, parts, th)) return;
  segment_expand_thread<T, N>(th.i, th.part, parts, y, offsets, rows_total, D, x);
}

template <typename T, int N>
__global__ void segment_pack_kernel(const T* __restrict__ x, const int64_t* __restrict__ offsets,
                                    int64_t S, int64_t rows_total, int64_t D, int64_t max_len,
                                    int64_t parts, T* __restrict__ packed) {
  PartThread th;
  if (!launch_part_thread<N>(S, D, parts, th)) return;
  segment_pack_thread<T, N>(th.i, th.part, parts, x, offsets, rows_total, D, max_len, packed);
}

template <typename T, int N>
__global__ void segment_unpack_kernel(const T* __restrict__ packed, const int64_t* __restrict__ offsets,
                                      int64_t S, int64_t rows_total, int64_t D, int64_t max_len,
                                      int64_t parts, T* __restrict__ x) {
  PartThread th;
  if (!launch_part_thread<N>(S, D, parts, th)) return;
  segment_unpack_thread<T, N>(th.i, th.part, parts, packed, offsets, rows_total, D, max_len, x);
}

// Launches kernel<T, N> over S * D / N * parts threads with N the vector width;
// launch(N, blocks, parts). mean_rows (rows, or packed slots, per segment) caps
// the row parts; 0 means no split.
template <typename T, typename Launch>
int launch_segments(int64_t S, int64_t D, int64_t mean_rows, std::initializer_list<const void*> buffers,
                    Launch&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  const int n = segment_vector_width<T>(D, buffers);
  const int64_t segment_threads = S * (D / n);
  if (segment_threads == 0) return cudaSuccess;
  const int64_t parts = row_parts(segment_threads, mean_rows);
  if (n == kVec) launch(std::integral_constant<int, kVec>{}, blocks_for(segment_threads * parts), parts);
  else launch(std::integral_constant<int, 1>{}, blocks_for(segment_threads * parts), parts);
  return cudaGetLastError();
}

// The reduce in blocks' workspace laid out over `base` (nullptr: sizes only), or
// total_bytes 0 when the reduce runs without blocks (reduce_blocks_from_rows,
// decided with the 16-byte vector width so that the adapter, which sizes the
// workspace before the buffers' alignment is looked at, and the launcher decide alike).
ReduceWorkspace reduce_workspace(void* base, DType dtype, int64_t S, int64_t T, int64_t D, int64_t longest) {
  ReduceWorkspace ws{};
  const int64_t vec = 16 / dtype_size(dtype);  // (fewer threads than N = 1 would run: blocks sooner)
  ws.blocks_from_rows = reduce_blocks_from_rows(S * ((D + vec - 1) / vec), S, T, longest);
  if (ws.blocks_from_rows == kNoBlocks) return ws;
  ws.blocks_bound = reduce_blocks_bound(S, T, ws.blocks_from_rows);
  const size_t array_bytes = align_up(sizeof(int64_t) * size_t(S + 1));
  char* p = static_cast<char*>(base);
  ws.counts = reinterpret_cast<int64_t*>(p);
  ws.block_begin = p ? reinterpret_cast<int64_t*>(p + array_bytes) : nullptr;
  cub::DeviceScan::ExclusiveSum(nullptr, ws.scan_bytes, ws.counts, ws.block_begin, S + 1);
  const size_t scan_room = align_up(ws.scan_bytes);
  ws.scan_temp = p ? p + 2 * array_bytes : nullptr;
  ws.partials = p ? p + 2 * array_bytes + scan_room : nullptr;
  const size_t acc_bytes = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  ws.total_bytes = 2 * array_bytes + scan_room + size_t(ws.blocks_bound) * size_t(D) * acc_bytes;
  return ws;
}

// Rows per segment, rounded up (the row parts' cap).
inline int64_t mean_rows(int64_t T, int64_t S) { return S > 0 ? (T + S - 1) / S : 0; }

}  // namespace

size_t word_boundaries_workspace_cuda(int64_t total_bytes) {
  const int64_t chunks = num_word_chunks(total_bytes, kWordChunkBytesCuda);
  const WordWorkspace ws = word_workspace(nullptr, chunks);
  return 2 * align_up(sizeof(int64_t) * size_t(chunks + 1)) + ws.scan_bytes;
}

int word_boundaries_count_cuda(const uint8_t* bytes, const int64_t* cu, int64_t B,
                               int64_t total_bytes, int64_t max_bytes, WordMode mode,
                               void* workspace, size_t workspace_bytes, int64_t* num_words,
                               void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = num_word_chunks(total_bytes, kWordChunkBytesCuda);
  WordWorkspace ws = word_workspace(workspace, chunks);
  if (workspace_bytes < word_boundaries_workspace_cuda(total_bytes)) return cudaErrorInvalidValue;
  word_count_kernel<<<blocks_for(chunks + 1), kThreads, 0, st>>>(bytes, cu, B, total_bytes, max_bytes,
                                                                 mode, chunks, ws.counts);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cub::DeviceScan::ExclusiveSum(ws.scan_temp, ws.scan_bytes, ws.counts, ws.offsets, chunks + 1, st);
  if (err != cudaSuccess) return err;
  err = cudaMemcpyAsync(num_words, ws.offsets + chunks, sizeof(int64_t), cudaMemcpyDeviceToHost, st);
  if (err != cudaSuccess) return err;
  return cudaStreamSynchronize(st);
}

int word_boundaries_fill_cuda(const uint8_t* bytes, const int64_t* cu, int64_t B,
                              int64_t total_bytes, int64_t max_bytes, WordMode mode,
                              const void* workspace, int64_t num_words, int64_t* word_offsets,
                              int64_t* word_cu, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = num_word_chunks(total_bytes, kWordChunkBytesCuda);
  const WordWorkspace ws = word_workspace(const_cast<void*>(workspace), chunks);
  if (chunks > 0)
    word_fill_kernel<<<blocks_for(chunks), kThreads, 0, st>>>(bytes, cu, B, total_bytes, max_bytes,
                                                              mode, chunks, ws.offsets, word_offsets);
  word_cu_kernel<<<blocks_for(B + 1), kThreads, 0, st>>>(cu, B, total_bytes, num_words, word_offsets,
                                                         word_cu);
  return cudaGetLastError();
}

size_t segment_reduce_workspace_cuda(DType dtype, int64_t S, int64_t T, int64_t D, int64_t longest) {
  return reduce_workspace(nullptr, dtype, S, T, D, longest).total_bytes;
}

int segment_reduce_cuda(DType dtype, const void* x, const int64_t* offsets, int64_t S, int64_t T,
                        int64_t D, Reduce reduce, int64_t longest, void* workspace, size_t workspace_bytes,
                        void* y, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const ReduceWorkspace ws = reduce_workspace(workspace, dtype, S, T, D, longest);
  if (ws.total_bytes > workspace_bytes) return cudaErrorInvalidValue;
  const bool in_blocks = ws.blocks_from_rows != kNoBlocks, all_in_blocks = ws.blocks_from_rows == 0;
  if (in_blocks) {  // count the blocks and scan the counts for pass 2
    segment_block_count_kernel<<<blocks_for(S + 1), kThreads, 0, st>>>(offsets, S, T, ws.blocks_from_rows,
                                                                       ws.counts);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    size_t scan_bytes = ws.scan_bytes;
    e = cub::DeviceScan::ExclusiveSum(ws.scan_temp, scan_bytes, ws.counts, ws.block_begin, S + 1, st);
    if (e != cudaSuccess) return e;
  }
  int err = cudaSuccess;
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<V>;
    dispatch_reduce(reduce, [&](auto r) {
      err = launch_segments<V>(S, D, 0, {x, y}, [&](auto n, unsigned blocks, int64_t) {
        constexpr int N = decltype(n)::value;
        constexpr Reduce R = decltype(r)::value;
        // segments of fewer than blocks_from_rows rows: a thread per (segment, vector)
        if (!all_in_blocks)
          segment_reduce_kernel<V, N, R><<<blocks, kThreads, 0, st>>>(static_cast<const V*>(x), offsets, S,
                                                                       T, D, ws.blocks_from_rows,
                                                                       static_cast<V*>(y));
        if (!in_blocks) return;
        segment_reduce_block_kernel<V, N, R><<<blocks_for(ws.blocks_bound * (D / N)), kThreads, 0, st>>>(
            static_cast<const V*>(x), offsets, ws.block_begin, S, T, D, ws.blocks_bound,
            static_cast<A*>(ws.partials));
        segment_reduce_combine_kernel<V, N, R><<<blocks, kThreads, 0, st>>>(
            static_cast<const A*>(ws.partials), offsets, ws.block_begin, S, ws.blocks_bound, T, D,
            ws.blocks_from_rows, static_cast<V*>(y));
      });
    });
  });
  return err;
}

size_t segment_reduce_backward_workspace_cuda(DType dtype, int64_t S, int64_t T, int64_t D, Reduce reduce) {
  if (reduce != Reduce::kMax && reduce != Reduce::kMin) return 0;
  // decided with the 16-byte vector width, as the forward's workspace: a narrower
  // one gives more segment threads, hence no more row parts
  const int64_t vec = 16 / dtype_size(dtype);
  if (!max_min_backward_in_parts(S * ((D + vec - 1) / vec), mean_rows(T, S))) return 0;
  return sizeof(int64_t) * size_t(S) * size_t(D);  // first_row
}

int segment_reduce_backward_cuda(DType dtype, const void* grad_y, const void* x, const void* y,
                                 const int64_t* offsets, int64_t S, int64_t T, int64_t D,
                                 Reduce reduce, void* workspace, size_t workspace_bytes, void* grad_x,
                                 void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool in_order = reduce == Reduce::kMax || reduce == Reduce::kMin;  // the first attaining row
  const size_t first_row_bytes = segment_reduce_backward_workspace_cuda(dtype, S, T, D, reduce);
  if (first_row_bytes > workspace_bytes) return cudaErrorInvalidValue;
  // max/min split into row parts only with the two passes' workspace
  const int64_t part_rows = in_order && first_row_bytes == 0 ? 0 : mean_rows(T, S);
  auto* first_row = static_cast<int64_t*>(workspace);
  int err = cudaSuccess;
  cudaError_t memset_err = cudaSuccess;  // (launch_segments reports launch errors only)
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    dispatch_reduce(reduce, [&](auto r) {
      err = launch_segments<V>(S, D, part_rows, {grad_y, x, y, grad_x}, [&](auto n, unsigned blocks, int64_t parts) {
        constexpr int N = decltype(n)::value;
        if (in_order && parts > 1) {  // two passes over the row parts
          memset_err = cudaMemsetAsync(first_row, 0x7f, first_row_bytes, st);  // kNoRow
          if (memset_err != cudaSuccess) return;
          max_min_first_rows_kernel<V, N><<<blocks, kThreads, 0, st>>>(
              static_cast<const V*>(x), static_cast<const V*>(y), offsets, S, T, D, parts, first_row);
          max_min_write_rows_kernel<V, N><<<blocks, kThreads, 0, st>>>(
              static_cast<const V*>(grad_y), first_row, offsets, S, T, D, parts, static_cast<V*>(grad_x));
          return;
        }
        segment_reduce_backward_kernel<V, N, decltype(r)::value><<<blocks, kThreads, 0, st>>>(
            static_cast<const V*>(grad_y), static_cast<const V*>(x), static_cast<const V*>(y), offsets, S, T, D,
            parts, static_cast<V*>(grad_x));
      });
    });
  });
  return memset_err != cudaSuccess ? int(memset_err) : err;
}

int segment_expand_cuda(DType dtype, const void* y, const int64_t* offsets, int64_t S, int64_t T,
                        int64_t D, void* x, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int err = cudaSuccess;
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    err = launch_segments<V>(S, D, mean_rows(T, S), {y, x}, [&](auto n, unsigned blocks, int64_t parts) {
      segment_expand_kernel<V, decltype(n)::value><<<blocks, kThreads, 0, st>>>(
          static_cast<const V*>(y), offsets, S, T, D, parts, static_cast<V*>(x));
    });
  });
  return err;
}

int segment_pack_cuda(DType dtype, const void* x, const int64_t* offsets, int64_t S, int64_t T,
                      int64_t D, int64_t max_len, void* packed, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int err = cudaSuccess;
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    err = launch_segments<V>(S, D, max_len, {x, packed}, [&](auto n, unsigned blocks, int64_t parts) {
      segment_pack_kernel<V, decltype(n)::value><<<blocks, kThreads, 0, st>>>(
          static_cast<const V*>(x), offsets, S, T, D, max_len, parts, static_cast<V*>(packed));
    });
  });
  return err;
}

int segment_unpack_cuda(DType dtype, const void* packed, const int64_t* offsets, int64_t S,
                        int64_t T, int64_t D, int64_t max_len, void* x, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int err = cudaSuccess;
  dispatch_float_types(dtype, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    err = launch_segments<V>(S, D, mean_rows(T, S), {packed, x},
                             [&](auto n, unsigned blocks, int64_t parts) {
      segment_unpack_kernel<V, decltype(n)::value><<<blocks, kThreads, 0, st>>>(
          static_cast<const V*>(packed), offsets, S, T, D, max_len, parts, static_cast<V*>(x));
    });
  });
  return err;
}

}  // namespace pooling
}  // namespace tokcore
