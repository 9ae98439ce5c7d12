// CUDA code shared by the families: offsets validation and error strings.
// Torch-free (see common_kernels.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common_kernels.h"
#include "tokcore/common/offsets.h"

namespace tokcore {
namespace {

constexpr int kThreads = 256;

// scratch[0] ends as the smallest key (i << 2) | status over the failing entries
// (status < 4), so the error reported is the first failing entry's, as on the CPU
// (check_offsets); all ones means every entry passed. scratch[1] = offsets[n-1].
// scratch[2] ends as the longest segment (-1 if none): a max over each block
// first, so that only one thread a block takes the atomic.
__global__ void validate_offsets_kernel(const int64_t* offsets, int64_t n, int64_t total,
                                        int64_t* scratch) {
  long long longest = -1;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int status = check_offsets_entry(offsets, n, i, total);
    if (status != kOffsetsOk)
      atomicMin(reinterpret_cast<unsigned long long*>(scratch),
                (static_cast<unsigned long long>(i) << 2) | static_cast<unsigned long long>(status));
    else if (i + 1 < n && offsets[i] >= 0)  // (a valid pair: the difference cannot overflow)
      longest = max(longest, static_cast<long long>(offsets[i + 1] - offsets[i]));
    if (i == n - 1) scratch[1] = offsets[i];
  }
  __shared__ long long warp_longest[kThreads / 32];
  for (int delta = 16; delta > 0; delta /= 2) longest = max(longest, __shfl_down_sync(0xffffffffu, longest, delta));
  if (threadIdx.x % 32 == 0) warp_longest[threadIdx.x / 32] = longest;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) longest = max(longest, warp_longest[w]);
    if (longest >= 0) atomicMax(reinterpret_cast<long long*>(scratch + 2), longest);
  }
}

}  // namespace

const char* cuda_error_string(int error) { return cudaGetErrorString(cudaError_t(error)); }

void clear_cuda_error() { (void)cudaGetLastError(); }

int validate_offsets_cuda(const int64_t* offsets, int64_t n, int64_t total, int64_t* device_scratch,
                          int64_t* host_result, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemsetAsync(device_scratch, 0xFF, 3 * sizeof(int64_t), st);
  if (err != cudaSuccess) return err;
  validate_offsets_kernel<<<unsigned(std::min<int64_t>(1024, (n + kThreads - 1) / kThreads)),
                            kThreads, 0, st>>>(offsets, n, total, device_scratch);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  int64_t scratch[3];
  err = cudaMemcpyAsync(scratch, device_scratch, sizeof(scratch), cudaMemcpyDeviceToHost, st);
  if (err != cudaSuccess) return err;
  if ((err = cudaStreamSynchronize(st)) != cudaSuccess) return err;
  const auto first_failure = static_cast<unsigned long long>(scratch[0]);
  host_result[0] = first_failure == ~0ull ? kOffsetsOk : int(first_failure & 3);
  host_result[1] = scratch[1];
  host_result[2] = scratch[2];
  host_result[3] = -1;
  host_result[4] = host_result[5] = 0;
  if (first_failure != ~0ull) {  // the error names the entry: read it (an error path, so a second sync is fine)
    const int64_t i = static_cast<int64_t>(first_failure >> 2);
    int64_t entries[2] = {0, 0};
    err = cudaMemcpyAsync(entries, offsets + i, (i + 1 < n ? 2 : 1) * sizeof(int64_t), cudaMemcpyDeviceToHost, st);
    if (err != cudaSuccess) return err;
    if ((err = cudaStreamSynchronize(st)) != cudaSuccess) return err;
    host_result[3] = i;
    host_result[4] = entries[0];
    host_result[5] = entries[1];
  }
  return cudaSuccess;
}

int cuda_stream_is_capturing(void* stream, int* capturing) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status);
  *capturing = status != cudaStreamCaptureStatusNone;
  return err;
}

}  // namespace tokcore
