// The CUDA launchers of a build without nvcc: they only report that the kernels
// are missing. The CUDA impl block is not registered in such a build, so these
// are reachable only by calling the launchers directly; they keep the adapter
// free of #ifdefs.
#include "pooling_kernels.h"

namespace tokcore {
namespace pooling {
namespace {
constexpr int kNotBuilt = -1;
}

size_t word_boundaries_workspace_cuda(int64_t) { return 0; }
int word_boundaries_count_cuda(const uint8_t*, const int64_t*, int64_t, int64_t, int64_t, WordMode, void*,
                               size_t, int64_t*, void*) { return kNotBuilt; }
int word_boundaries_fill_cuda(const uint8_t*, const int64_t*, int64_t, int64_t, int64_t, WordMode,
                              const void*, int64_t, int64_t*, int64_t*, void*) { return kNotBuilt; }
size_t segment_reduce_workspace_cuda(DType, int64_t, int64_t, int64_t, int64_t) { return 0; }
int segment_reduce_cuda(DType, const void*, const int64_t*, int64_t, int64_t, int64_t, Reduce, int64_t,
                        void*, size_t, void*, void*) { return kNotBuilt; }
size_t segment_reduce_backward_workspace_cuda(DType, int64_t, int64_t, int64_t, Reduce) { return 0; }
int segment_reduce_backward_cuda(DType, const void*, const void*, const void*, const int64_t*, int64_t,
                                 int64_t, int64_t, Reduce, void*, size_t, void*, void*) { return kNotBuilt; }
int segment_expand_cuda(DType, const void*, const int64_t*, int64_t, int64_t, int64_t, void*, void*) {
  return kNotBuilt;
}
int segment_pack_cuda(DType, const void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, void*,
                      void*) { return kNotBuilt; }
int segment_unpack_cuda(DType, const void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, void*,
                        void*) { return kNotBuilt; }

}  // namespace pooling
}  // namespace tokcore
