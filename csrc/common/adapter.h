// Helpers shared by every family's torch adapter (<family>_ops.cpp): argument
// checks whose messages name the op and the argument, dtype mapping into the
// torch-free core, the CPU thread pool and the current CUDA stream.
// Only the libtorch stable ABI is used (see CMakeLists.txt: TORCH_TARGET_VERSION).
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cctype>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common_kernels.h"
#include "tokcore/common/dtype.h"
#include "tokcore/common/offsets.h"
#include "tokcore/common/parallel.h"

namespace tokcore {
namespace adapter {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Throws std::runtime_error (RuntimeError in Python) whose message starts with
// "tokcore.<op>: " and names the argument.
template <typename... Args>
[[noreturn]] inline void fail(const char* op, const Args&... parts) {
  std::ostringstream message;
  message << "tokcore." << op << ": ";
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

#define TOKCORE_CHECK(cond, op, ...)                  \
  do {                                                \
    if (!(cond)) ::tokcore::adapter::fail(op, __VA_ARGS__); \
  } while (0)

// torch's Python name of a dtype ("float32", "complex64", "float8_e4m3fn"), so
// that messages match the fake kernels' (python/tokcore/<family>/ops.py).
inline std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::ComplexHalf: return "complex32";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    default: {  // the others' C++ names are their Python names, capitalized: BFloat16, UInt16, Float8_e5m2
      std::string name = torch::headeronly::toString(t);
      for (char& c : name) c = char(std::tolower(static_cast<unsigned char>(c)));
      return name;
    }
  }
}

inline DType feature_dtype(const Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Half: return DType::kFloat16;
    default:
      TOKCORE_CHECK(false, op, arg, " must be float32, float64, bfloat16 or float16, got ",
                    dtype_name(t.scalar_type()));
  }
  return DType::kFloat32;
}

inline void check_dtype(const Tensor& t, ScalarType dtype, const char* op, const char* arg) {
  TOKCORE_CHECK(t.scalar_type() == dtype, op, arg, " must be ", dtype_name(dtype), ", got ",
                dtype_name(t.scalar_type()));
}

inline void check_dim(const Tensor& t, int64_t dim, const char* op, const char* arg) {
  TOKCORE_CHECK(t.dim() == dim, op, arg, " must have ", dim, dim == 1 ? " dimension" : " dimensions",
                ", got ", t.dim());
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  const bool same = t.is_cuda() == ref.is_cuda() &&
                    (!t.is_cuda() || t.get_device_index() == ref.get_device_index());
  TOKCORE_CHECK(same, op, arg, " must be on the same device as ", ref_arg);
}

inline void check_supported_device(const Tensor& t, const char* op, const char* arg) {
  TOKCORE_CHECK(t.is_cpu() || t.is_cuda(), op, arg, " must be a CPU or CUDA tensor");
}

// What the last entry of an offsets argument must be, and what an error calls that
// number ("x.shape[0]", "total", "len(bytes)"): the user sees which of the two
// arguments disagree. value < 0: any end (the offsets give the size).
struct OffsetsEnd {
  int64_t value;
  const char* name;
};
inline constexpr OffsetsEnd kAnyEnd{-1, ""};

// What an offsets check found: the status of its first failing entry
// (tokcore/common/offsets.h), that entry's index i, offsets[i] and offsets[i + 1]
// (0 where there is none), and the last entry.
struct OffsetsCheck {
  int status;
  int64_t index, value, next, last;
};

// Raises the error of a failed offsets check, naming the first bad entry; a wrong
// end names both numbers, the mistake users make most.
inline void check_offsets_result(const OffsetsCheck& c, OffsetsEnd end, const char* op, const char* arg) {
  switch (c.status) {
    case kOffsetsOk: return;
    case kOffsetsFirstNotZero: fail(op, arg, " must start at 0, but ", arg, "[0] = ", c.value);
    case kOffsetsDecreasing:
      fail(op, arg, " must be non-decreasing, but ", arg, "[", c.index + 1, "] = ", c.next, " < ", arg, "[",
           c.index, "] = ", c.value);
    case kOffsetsLastNotTotal:
      fail(op, arg, " must end at ", end.name, " = ", end.value, ", but its last entry is ", c.last);
    default: fail(op, arg, " failed an unknown offsets check (status ", c.status, ")");
  }
}

// Full validation of CSR offsets held on the CPU (cheap, so always done).
inline void check_offsets_cpu(const Tensor& offsets, OffsetsEnd end, const char* op, const char* arg) {
  const int64_t n = offsets.size(0);
  const int64_t* data = offsets.const_data_ptr<int64_t>();
  const OffsetsFailure f = first_offsets_failure(data, n, end.value);
  if (f.status == kOffsetsOk) return;
  check_offsets_result({f.status, f.index, data[f.index], f.index + 1 < n ? data[f.index + 1] : 0, data[n - 1]},
                       end, op, arg);
}

// Basic checks of an offsets argument: int64, 1-D, at least one entry.
inline void check_offsets_tensor(const Tensor& offsets, const char* op, const char* arg) {
  check_dtype(offsets, ScalarType::Long, op, arg);
  check_dim(offsets, 1, op, arg);
  TOKCORE_CHECK(offsets.size(0) >= 1, op, arg, " must have at least one entry (", arg, "[0] = 0)");
}

// t itself, or a contiguous copy of it (a strided, sliced or broadcast argument):
// failing to allocate that copy is an error that names the argument.
Tensor contiguous_copy(const Tensor& t, const char* op, const char* arg);
inline Tensor contiguous(const Tensor& t, const char* op, const char* arg) {
  return t.is_contiguous() ? t : contiguous_copy(t, op, arg);
}

// The CPU runtime: torch's own intra-op thread pool.
inline void torch_parallel_for(int64_t begin, int64_t end, int64_t grain, void* ctx,
                               void (*body)(void*, int64_t, int64_t)) {
  torch::stable::parallel_for(begin, end, grain,
                              [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

inline Runtime cpu_runtime() {
  Runtime rt;
  rt.parallel_for = &torch_parallel_for;
  rt.threads = int64_t(torch::stable::get_num_threads());
  return rt;
}

// A new contiguous output tensor of `sizes`, on like's device, of like's dtype
// (or `dtype`). Large CPU outputs (>= 16 MB) come from the CPU output cache: a
// buffer that an earlier output of the same size gave back when it was freed,
// else fresh memory backed by huge pages. On the VMs here a fresh large buffer
// costs more than the kernel that fills it (the OS zeroes it, and memory the VM
// returned to its host faults back in: measured 250 ms instead of 13 ms for a
// 107 MB output), and training loops ask for the same sizes every step. Cached
// outputs are ordinary tensors except that their storage cannot grow
// (`resize_` to a larger size fails, as for tensors made by `torch.from_numpy`).
// TOKCORE_CPU_OUTPUT_CACHE_MB sets how much freed memory is kept for reuse
// (default 2048; 0 turns the cache off). Needs torch >= 2.11 (torch_from_blob
// with a deleter, looked up at run time); older torch gets plain outputs.
// Raises, naming op, when the size overflows int64 or the memory cannot be had.
Tensor new_output(const char* op, const Tensor& like, std::initializer_list<int64_t> sizes,
                  std::optional<ScalarType> dtype = std::nullopt);

// The current CUDA stream of a device, looked up in libtorch_cuda at run time
// so that the library also loads on a CPU-only torch (defined in adapter.cpp).
void* current_cuda_stream(int32_t device_index);

// Device guard + current stream of the device holding t, for the CUDA launchers.
// (Only reached through CUDA impl blocks, registered in CUDA builds; a build
// without CUDA links the *_cuda_stub.cpp files, whose launchers report an error.)
struct CudaContext {
  torch::stable::accelerator::DeviceGuard guard;
  void* stream;
  explicit CudaContext(const Tensor& t)
      : guard(t.get_device_index()), stream(current_cuda_stream(t.get_device_index())) {}
};

// Raises the error of a tokcore CUDA launcher (a cudaError_t as int; 0 is success),
// clearing it from tokcore's CUDA runtime so that the next call does not report it
// again. A kernel fault is reported by the next call that syncs, so it may come
// from an earlier launch.
inline void check_cuda(int error, const char* op) {
  if (error == 0) return;
  clear_cuda_error();
  fail(op, "CUDA error: ", cuda_error_string(error),
       " (an error of an asynchronous launch can surface in a later call; CUDA_LAUNCH_BLOCKING=1 pins it down)");
}

// Whether `stream` is being captured into a CUDA graph, where no host sync is allowed.
inline bool stream_is_capturing(void* stream, const char* op) {
  int capturing = 0;
  check_cuda(cuda_stream_is_capturing(stream, &capturing), op);
  return capturing != 0;
}

// Ops that must read from the device to size their output (a host sync) cannot run
// while `stream` is being captured into a CUDA graph; raises, naming op, before the
// stream is touched (a failed sync would also end the user's capture). `needs` says
// what is read, `instead` what to do.
inline void check_not_capturing(void* stream, const char* op, const char* needs, const char* instead) {
  TOKCORE_CHECK(!stream_is_capturing(stream, op), op, needs,
                " (a host sync), which CUDA graph capture does not allow; ", instead);
}

// What the CUDA offsets check reads on its way: the last entry, and the most rows
// of any segment (-1 if there is none).
struct ValidatedOffsets {
  int64_t end, longest;
};

// Validates CUDA offsets on the device (one small kernel and a host sync) against
// their end; for ops that must sync anyway, e.g. to size their output (defined in
// adapter.cpp).
ValidatedOffsets validated_offsets_cuda(const Tensor& offsets, OffsetsEnd end, void* stream,
                                        const char* op, const char* arg);

// Full validation of CUDA offsets before a kernel uses them, with the CPU's errors:
// one small kernel and a host sync, which waits for the work already queued on the
// stream, so the host stops running ahead of the GPU at each checked call. Skipped
// while `stream` is being captured into a CUDA graph, where a sync is not allowed,
// and when TOKCORE_CUDA_CHECK_OFFSETS=0 (read at import and on reload_settings(), never
// by a call: tokcore/common/settings.h), for callers whose offsets are known good
// (e.g. made by word_boundaries) and who want no sync.
// Unchecked invalid offsets give unspecified values but never an out-of-bounds
// access: the kernels clamp offsets into range. Returns the longest segment's rows
// (ValidatedOffsets), or -1 where the check was skipped.
int64_t check_offsets_cuda(const Tensor& offsets, OffsetsEnd end, void* stream, const char* op,
                           const char* arg);

// Full validation of offsets against their end on the device holding them:
// check_offsets_cpu, or check_offsets_cuda on the offsets' device and current stream.
// check_on_cuda = false (an op's check_offsets=False) skips the CUDA check and its
// sync, for offsets validated before (an autograd backward reuses its forward's,
// which autograd's version counter keeps unchanged); CPU offsets are checked
// regardless, since there the check costs no sync. Returns the longest segment's
// rows where the CUDA check read it, for kernels that route long segments apart;
// -1 otherwise (on the CPU, where no kernel asks for it, too).
inline int64_t check_offsets(const Tensor& offsets, OffsetsEnd end, const char* op, const char* arg,
                             bool check_on_cuda = true) {
  if (offsets.is_cpu()) {
    check_offsets_cpu(offsets, end, op, arg);
    return -1;
  }
  if (!check_on_cuda) return -1;
  CudaContext ctx(offsets);
  return check_offsets_cuda(offsets, end, ctx.stream, op, arg);
}

}  // namespace adapter
}  // namespace tokcore
