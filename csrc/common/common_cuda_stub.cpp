// The shared CUDA entry points of a build without nvcc: they only report that the
// kernels are missing (the CUDA impl blocks are not registered in such a build).
#include "common_kernels.h"

namespace tokcore {

const char* cuda_error_string(int) { return "tokcore was built without CUDA kernels"; }
int validate_offsets_cuda(const int64_t*, int64_t, int64_t, int64_t*, int64_t*, void*) { return -1; }
int cuda_stream_is_capturing(void*, int*) { return -1; }
void clear_cuda_error() {}

}  // namespace tokcore
