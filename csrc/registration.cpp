// Every op schema of tokcore, in one place (DESIGN.md §5 is the contract).
// Kernels are registered per backend in csrc/<family>/<family>_ops.cpp; fake
// kernels and autograd in python/tokcore/<family>/ops.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(tokcore, m) {
  // ---- about the build (csrc/common/info_ops.cpp)
  m.def("_cpu_isa_level() -> int");

  // ---- pooling: bytes to words and back
  m.def("word_boundaries(Tensor bytes, Tensor cu_seqlens, int max_word_bytes, str mode) -> (Tensor, Tensor)");
  // check_offsets=False skips the CUDA offsets check and its host sync, for offsets
  // already validated (the autograd backward passes); CPU offsets are always checked.
  m.def("segment_reduce(Tensor x, Tensor offsets, str reduce, *, bool check_offsets=True) -> Tensor");
  m.def("segment_reduce_backward(Tensor grad_y, Tensor offsets, SymInt total, str reduce, Tensor? x=None, Tensor? y=None, *, bool check_offsets=True) -> Tensor");
  m.def("segment_expand(Tensor y, Tensor offsets, SymInt? total=None, *, bool check_offsets=True) -> Tensor");
  m.def("segment_pack(Tensor x, Tensor offsets, SymInt max_len, *, bool check_offsets=True) -> Tensor");
  m.def("segment_unpack(Tensor packed, Tensor offsets, SymInt? total=None, *, bool check_offsets=True) -> Tensor");
}
