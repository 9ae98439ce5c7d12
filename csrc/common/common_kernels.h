// Torch-free entry points shared by every family's CUDA adapter code (CUDA in
// common_cuda.cu; common_cuda_stub.cpp in a build without nvcc).
#pragma once

#include <cstdint>

namespace tokcore {

// Validates CSR offsets [n] held on the device against total (< 0: any total) and
// reads their last entry and longest segment. host_result[6]: [0] = OffsetsStatus
// of the first failing entry (tokcore/common/offsets.h), [1] = offsets[n-1],
// [2] = the largest offsets[i+1] - offsets[i] (-1 for n = 1; meaningful only for
// valid offsets), [3] = the first failing entry's index i (-1 if none), [4] and
// [5] = offsets[i] and offsets[i+1] (0 where there is none; read only on failure).
// device_scratch holds 3 int64. Synchronizes the stream (stream is a
// cudaStream_t). Returns a cudaError_t as int.
int validate_offsets_cuda(const int64_t* offsets, int64_t n, int64_t total, int64_t* device_scratch,
                          int64_t* host_result, void* stream);

// Sets *capturing to whether `stream` (a cudaStream_t) is being captured into a CUDA
// graph, where a host sync is not allowed. Returns a cudaError_t as int.
int cuda_stream_is_capturing(void* stream, int* capturing);

// The message of a cudaError_t returned by any tokcore launcher.
const char* cuda_error_string(int error);

// Clears the last error of tokcore's own CUDA runtime (linked statically, so torch
// never clears it): a failed call leaves its error there, and the next launch's
// cudaGetLastError would report it as its own. Called once the error is raised.
void clear_cuda_error();

}  // namespace tokcore
