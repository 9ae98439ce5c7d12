// Torch adapter of the pooling family: argument checks, output allocation,
// device guard and stream, then a call into the torch-free kernels
// (pooling_cpu.cpp, pooling_cuda.cu). Schemas live in csrc/registration.cpp.
#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/adapter.h"
#include "pooling_kernels.h"

namespace tokcore {
namespace pooling {
namespace {

using adapter::check_cuda;
using adapter::CudaContext;
using adapter::ScalarType;
using adapter::Tensor;

Reduce parse_reduce(const std::string& reduce, const char* op) {
  if (reduce == "sum") return Reduce::kSum;
  if (reduce == "mean") return Reduce::kMean;
  if (reduce == "max") return Reduce::kMax;
  if (reduce == "min") return Reduce::kMin;
  TOKCORE_CHECK(false, op, "reduce must be one of sum, mean, max, min, got '", reduce, "'");
  return Reduce::kSum;
}

WordMode parse_mode(const std::string& mode) {
  if (mode == "space") return WordMode::kSpace;
  if (mode == "bytes") return WordMode::kBytes;
  TOKCORE_CHECK(false, "word_boundaries", "mode must be 'space' or 'bytes', got '", mode, "'");
  return WordMode::kSpace;
}

// Checks shared by the ops that take [rows, D] features and CSR offsets.
void check_features_and_offsets(const Tensor& x, const char* x_arg, int64_t x_dim,
                                const Tensor& offsets, const char* op) {
  adapter::check_supported_device(x, op, x_arg);
  adapter::feature_dtype(x, op, x_arg);
  adapter::check_dim(x, x_dim, op, x_arg);
  adapter::check_offsets_tensor(offsets, op, "offsets");
  adapter::check_same_device(offsets, x, op, "offsets", x_arg);
}

// Number of rows T of an expand/unpack output: `total` when given, else offsets[-1]
// (read with a host sync on CUDA, which validates the offsets on the way).
int64_t output_rows(const Tensor& offsets, std::optional<int64_t> total, const char* op,
                    bool check_offsets) {
  if (total.has_value()) {
    TOKCORE_CHECK(*total >= 0, op, "total must be >= 0, got ", *total);
    adapter::check_offsets(offsets, {*total, "total"}, op, "offsets", check_offsets);
    return *total;
  }
  if (offsets.is_cpu()) {
    adapter::check_offsets_cpu(offsets, adapter::kAnyEnd, op, "offsets");
    return offsets.const_data_ptr<int64_t>()[offsets.size(0) - 1];
  }
  CudaContext ctx(offsets);
  adapter::check_not_capturing(ctx.stream, op, "total=None reads the number of rows from offsets on the device",
                               "pass total");
  return adapter::validated_offsets_cuda(offsets, adapter::kAnyEnd, ctx.stream, op, "offsets").end;
}

// ---------------------------------------------------------------- word_boundaries

std::tuple<Tensor, Tensor> word_boundaries(Tensor bytes, Tensor cu_seqlens, int64_t max_word_bytes,
                                           std::string mode) {
  const char* op = "word_boundaries";
  adapter::check_supported_device(bytes, op, "bytes");
  adapter::check_dtype(bytes, ScalarType::Byte, op, "bytes");
  adapter::check_dim(bytes, 1, op, "bytes");
  adapter::check_offsets_tensor(cu_seqlens, op, "cu_seqlens");
  adapter::check_same_device(cu_seqlens, bytes, op, "cu_seqlens", "bytes");
  TOKCORE_CHECK(max_word_bytes >= 4, op, "max_word_bytes must be >= 4, got ", max_word_bytes);
  const WordMode word_mode = parse_mode(mode);
  bytes = adapter::contiguous(bytes, op, "bytes");
  cu_seqlens = adapter::contiguous(cu_seqlens, op, "cu_seqlens");
  const int64_t T = bytes.size(0);
  const int64_t B = cu_seqlens.size(0) - 1;

  if (bytes.is_cpu()) {
    adapter::check_offsets_cpu(cu_seqlens, {T, "len(bytes)"}, op, "cu_seqlens");
    const uint8_t* data = bytes.const_data_ptr<uint8_t>();
    const int64_t* cu = cu_seqlens.const_data_ptr<int64_t>();
    const Runtime rt = adapter::cpu_runtime();
    std::vector<int64_t> chunk_counts(num_word_chunks(T, kWordChunkBytesCpu));
    const int64_t W =
        word_boundaries_count_cpu(rt, data, cu, B, max_word_bytes, word_mode, chunk_counts.data());
    Tensor word_offsets = adapter::new_output(op, bytes, {W + 1}, ScalarType::Long);
    Tensor word_cu = adapter::new_output(op, bytes, {B + 1}, ScalarType::Long);
    const bool counts_hold =
        word_boundaries_fill_cpu(rt, data, cu, B, max_word_bytes, word_mode, chunk_counts.data(), W,
                                 word_offsets.mutable_data_ptr<int64_t>(), word_cu.mutable_data_ptr<int64_t>());
    TOKCORE_CHECK(counts_hold, op, "bytes changed while the words were being found (another thread "
                  "wrote to it during the call)");
    return {word_offsets, word_cu};
  }
  CudaContext ctx(bytes);
  adapter::check_not_capturing(ctx.stream, op, "the number of words sizes the output and is read from the device",
                               "find the words before capturing");
  adapter::validated_offsets_cuda(cu_seqlens, {T, "len(bytes)"}, ctx.stream, op, "cu_seqlens");
  const size_t ws_bytes = word_boundaries_workspace_cuda(T);
  Tensor workspace =
      adapter::new_output(op, bytes, {int64_t(ws_bytes > 0 ? ws_bytes : 1)}, ScalarType::Byte);
  int64_t W = 0;
  check_cuda(word_boundaries_count_cuda(bytes.const_data_ptr<uint8_t>(),
                                        cu_seqlens.const_data_ptr<int64_t>(), B, T, max_word_bytes,
                                        word_mode, workspace.mutable_data_ptr(), ws_bytes, &W,
                                        ctx.stream),
             op);
  Tensor word_offsets = adapter::new_output(op, bytes, {W + 1}, ScalarType::Long);
  Tensor word_cu = adapter::new_output(op, bytes, {B + 1}, ScalarType::Long);
  check_cuda(word_boundaries_fill_cuda(bytes.const_data_ptr<uint8_t>(),
                                       cu_seqlens.const_data_ptr<int64_t>(), B, T, max_word_bytes,
                                       word_mode, workspace.const_data_ptr(), W,
                                       word_offsets.mutable_data_ptr<int64_t>(),
                                       word_cu.mutable_data_ptr<int64_t>(), ctx.stream),
             op);
  return {word_offsets, word_cu};
}

// ---------------------------------------------------------------- segment ops

Tensor segment_reduce(Tensor x, Tensor offsets, std::string reduce, bool check_offsets) {
  const char* op = "segment_reduce";
  check_features_and_offsets(x, "x", 2, offsets, op);
  const Reduce r = parse_reduce(reduce, op);
  x = adapter::contiguous(x, op, "x");
  offsets = adapter::contiguous(offsets, op, "offsets");
  const int64_t T = x.size(0), D = x.size(1), S = offsets.size(0) - 1;
  const DType dtype = adapter::feature_dtype(x, op, "x");
  // (on CUDA the check also reads the longest segment, which the kernels route apart)
  const int64_t longest = adapter::check_offsets(offsets, {T, "x.shape[0]"}, op, "offsets", check_offsets);
  Tensor y = adapter::new_output(op, x, {S, D});
  if (y.numel() == 0) return y;  // (its data pointer may be null: the kernels would copy to it)
  if (x.is_cpu()) {
    segment_reduce_cpu(adapter::cpu_runtime(), dtype, x.const_data_ptr(),
                       offsets.const_data_ptr<int64_t>(), S, T, D, r, y.mutable_data_ptr());
    return y;
  }
  CudaContext ctx(x);
  // a workspace only for long segments, which the kernels reduce in blocks
  const size_t ws_bytes = segment_reduce_workspace_cuda(dtype, S, T, D, longest);
  std::optional<Tensor> workspace;
  if (ws_bytes > 0) workspace = adapter::new_output(op, x, {int64_t(ws_bytes)}, ScalarType::Byte);
  check_cuda(segment_reduce_cuda(dtype, x.const_data_ptr(), offsets.const_data_ptr<int64_t>(), S, T,
                                 D, r, longest, workspace ? workspace->mutable_data_ptr() : nullptr, ws_bytes,
                                 y.mutable_data_ptr(), ctx.stream),
             op);
  return y;
}

Tensor segment_reduce_backward(Tensor grad_y, Tensor offsets, int64_t total, std::string reduce,
                               std::optional<Tensor> x, std::optional<Tensor> y,
                               bool check_offsets) {
  const char* op = "segment_reduce_backward";
  check_features_and_offsets(grad_y, "grad_y", 2, offsets, op);
  const Reduce r = parse_reduce(reduce, op);
  const int64_t S = offsets.size(0) - 1, D = grad_y.size(1);
  TOKCORE_CHECK(grad_y.size(0) == S, op, "grad_y must have len(offsets) - 1 = ", S, " rows, got ",
                grad_y.size(0));
  TOKCORE_CHECK(total >= 0, op, "total must be >= 0, got ", total);
  const bool needs_values = r == Reduce::kMax || r == Reduce::kMin;
  if (needs_values) {
    TOKCORE_CHECK(x.has_value() && y.has_value(), op, "x and y are required for reduce='", reduce,
                  "'");
    for (auto [t, arg] : {std::pair<const Tensor*, const char*>{&*x, "x"}, {&*y, "y"}}) {
      adapter::check_dim(*t, 2, op, arg);
      adapter::check_same_device(*t, grad_y, op, arg, "grad_y");
      TOKCORE_CHECK(t->scalar_type() == grad_y.scalar_type(), op, arg,
                    " must have the dtype of grad_y");
      TOKCORE_CHECK(t->size(1) == D, op, arg, " must have ", D, " columns, got ", t->size(1));
    }
    TOKCORE_CHECK(x->size(0) == total, op, "x must have total = ", total, " rows, got ", x->size(0));
    TOKCORE_CHECK(y->size(0) == S, op, "y must have len(offsets) - 1 = ", S, " rows, got ",
                  y->size(0));
    x = adapter::contiguous(*x, op, "x");
    y = adapter::contiguous(*y, op, "y");
  }
  grad_y = adapter::contiguous(grad_y, op, "grad_y");
  offsets = adapter::contiguous(offsets, op, "offsets");
  const DType dtype = adapter::feature_dtype(grad_y, op, "grad_y");
  const void* x_ptr = needs_values ? x->const_data_ptr() : nullptr;
  const void* y_ptr = needs_values ? y->const_data_ptr() : nullptr;
  adapter::check_offsets(offsets, {total, "total"}, op, "offsets", check_offsets);
  Tensor grad_x = adapter::new_output(op, grad_y, {total, D});
  if (grad_x.numel() == 0) return grad_x;
  if (grad_y.is_cpu()) {
    segment_reduce_backward_cpu(adapter::cpu_runtime(), dtype, grad_y.const_data_ptr(), x_ptr, y_ptr,
                                offsets.const_data_ptr<int64_t>(), S, total, D, r,
                                grad_x.mutable_data_ptr());
    return grad_x;
  }
  CudaContext ctx(grad_y);
  // a workspace only for a max/min backward over a few long segments (in two passes)
  const size_t ws_bytes = segment_reduce_backward_workspace_cuda(dtype, S, total, D, r);
  std::optional<Tensor> workspace;
  if (ws_bytes > 0) workspace = adapter::new_output(op, grad_y, {int64_t(ws_bytes)}, ScalarType::Byte);
  check_cuda(segment_reduce_backward_cuda(dtype, grad_y.const_data_ptr(), x_ptr, y_ptr,
                                          offsets.const_data_ptr<int64_t>(), S, total, D, r,
                                          workspace ? workspace->mutable_data_ptr() : nullptr, ws_bytes,
                                          grad_x.mutable_data_ptr(), ctx.stream),
             op);
  return grad_x;
}

Tensor segment_expand(Tensor y, Tensor offsets, std::optional<int64_t> total, bool check_offsets) {
  const char* op = "segment_expand";
  check_features_and_offsets(y, "y", 2, offsets, op);
  const int64_t S = offsets.size(0) - 1, D = y.size(1);
  TOKCORE_CHECK(y.size(0) == S, op, "y must have len(offsets) - 1 = ", S, " rows, got ", y.size(0));
  y = adapter::contiguous(y, op, "y");
  offsets = adapter::contiguous(offsets, op, "offsets");
  const DType dtype = adapter::feature_dtype(y, op, "y");
  const int64_t T = output_rows(offsets, total, op, check_offsets);
  Tensor x = adapter::new_output(op, y, {T, D});
  if (x.numel() == 0) return x;
  if (y.is_cpu()) {
    segment_expand_cpu(adapter::cpu_runtime(), dtype, y.const_data_ptr(),
                       offsets.const_data_ptr<int64_t>(), S, T, D, x.mutable_data_ptr());
    return x;
  }
  CudaContext ctx(y);
  check_cuda(segment_expand_cuda(dtype, y.const_data_ptr(), offsets.const_data_ptr<int64_t>(), S, T,
                                 D, x.mutable_data_ptr(), ctx.stream),
             op);
  return x;
}

Tensor segment_pack(Tensor x, Tensor offsets, int64_t max_len, bool check_offsets) {
  const char* op = "segment_pack";
  check_features_and_offsets(x, "x", 2, offsets, op);
  TOKCORE_CHECK(max_len >= 0, op, "max_len must be >= 0, got ", max_len);
  x = adapter::contiguous(x, op, "x");
  offsets = adapter::contiguous(offsets, op, "offsets");
  const int64_t T = x.size(0), D = x.size(1), S = offsets.size(0) - 1;
  // named here, before new_output's generic size check, since max_len is the usual
  // culprit; with sizes of 0 counted as 1, as torch's strides count them (an output
  // [0, 2^62, 3] has no bytes, but its first stride overflows)
  int64_t packed_bytes = 0;
  const bool overflow =
      __builtin_mul_overflow(std::max<int64_t>(S, 1), std::max<int64_t>(max_len, 1), &packed_bytes) ||
      __builtin_mul_overflow(packed_bytes, std::max<int64_t>(D, 1), &packed_bytes) ||
      __builtin_mul_overflow(packed_bytes, int64_t(x.element_size()), &packed_bytes);
  TOKCORE_CHECK(!overflow, op, "max_len = ", max_len, " is too large: the packed output [", S,
                ", max_len, ", D, "] would have sizes or strides past int64");
  const DType dtype = adapter::feature_dtype(x, op, "x");
  adapter::check_offsets(offsets, {T, "x.shape[0]"}, op, "offsets", check_offsets);
  Tensor packed = adapter::new_output(op, x, {S, max_len, D});
  if (packed.numel() == 0) return packed;
  if (x.is_cpu()) {
    segment_pack_cpu(adapter::cpu_runtime(), dtype, x.const_data_ptr(),
                     offsets.const_data_ptr<int64_t>(), S, T, D, max_len,
                     packed.mutable_data_ptr());
    return packed;
  }
  CudaContext ctx(x);
  check_cuda(segment_pack_cuda(dtype, x.const_data_ptr(), offsets.const_data_ptr<int64_t>(), S, T, D,
                               max_len, packed.mutable_data_ptr(), ctx.stream),
             op);
  return packed;
}

Tensor segment_unpack(Tensor packed, Tensor offsets, std::optional<int64_t> total,
                      bool check_offsets) {
  const char* op = "segment_unpack";
  check_features_and_offsets(packed, "packed", 3, offsets, op);
  const int64_t S = offsets.size(0) - 1, L = packed.size(1), D = packed.size(2);
  TOKCORE_CHECK(packed.size(0) == S, op, "packed must have len(offsets) - 1 = ", S,
                " segments, got ", packed.size(0));
  packed = adapter::contiguous(packed, op, "packed");
  offsets = adapter::contiguous(offsets, op, "offsets");
  const DType dtype = adapter::feature_dtype(packed, op, "packed");
  const int64_t T = output_rows(offsets, total, op, check_offsets);
  Tensor x = adapter::new_output(op, packed, {T, D});
  if (x.numel() == 0) return x;
  if (packed.is_cpu()) {
    segment_unpack_cpu(adapter::cpu_runtime(), dtype, packed.const_data_ptr(),
                       offsets.const_data_ptr<int64_t>(), S, T, D, L, x.mutable_data_ptr());
    return x;
  }
  CudaContext ctx(packed);
  check_cuda(segment_unpack_cuda(dtype, packed.const_data_ptr(), offsets.const_data_ptr<int64_t>(), S,
                                 T, D, L, x.mutable_data_ptr(), ctx.stream),
             op);
  return x;
}

}  // namespace
}  // namespace pooling
}  // namespace tokcore

// One function per op serves both backends (the device branch is inside), so the
// same boxed kernel is registered for CPU and CUDA.
#define TOKCORE_POOLING_IMPLS(m)                                                          \
  m.impl("word_boundaries", TORCH_BOX(&tokcore::pooling::word_boundaries));               \
  m.impl("segment_reduce", TORCH_BOX(&tokcore::pooling::segment_reduce));                 \
  m.impl("segment_reduce_backward", TORCH_BOX(&tokcore::pooling::segment_reduce_backward)); \
  m.impl("segment_expand", TORCH_BOX(&tokcore::pooling::segment_expand));                 \
  m.impl("segment_pack", TORCH_BOX(&tokcore::pooling::segment_pack));                     \
  m.impl("segment_unpack", TORCH_BOX(&tokcore::pooling::segment_unpack));

STABLE_TORCH_LIBRARY_IMPL(tokcore, CPU, m) { TOKCORE_POOLING_IMPLS(m) }

#ifdef TOKCORE_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(tokcore, CUDA, m) { TOKCORE_POOLING_IMPLS(m) }
#endif
