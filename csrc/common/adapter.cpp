#include "adapter.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include <sys/mman.h>

#include "tokcore/common/settings.h"

namespace tokcore {
namespace adapter {

namespace {

constexpr size_t kHugePage = size_t(1) << 21;
constexpr size_t kCachedOutputMinBytes = size_t(16) << 20;

uintptr_t round_up_to_huge_page(uintptr_t n) { return (n + kHugePage - 1) & ~uintptr_t(kHugePage - 1); }

bool huge_pages_enabled() { return settings().huge_pages; }

// Bytes of freed outputs the cache may keep (TOKCORE_CPU_OUTPUT_CACHE_MB, which
// tests and users may change at run time with tokcore.reload_settings()).
size_t output_cache_limit() {
  const long long mb = settings().output_cache_mb;  // 0: off
  return size_t(std::min<long long>(mb, 1LL << 40)) << 20;
}

// A function of torch's shim that this torch may lack, or null. Python loads
// torch's libraries with RTLD_LOCAL, so a global lookup can miss them: then the
// already loaded library is asked by name.
void* torch_symbol(const char* name, const char* library) {
  void* sym = dlsym(RTLD_DEFAULT, name);
  if (sym == nullptr) {
    if (void* lib = dlopen(library, RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, name);
  }
  return sym;
}

// torch_from_blob (torch >= 2.11): a tensor over our buffer whose deleter we choose.
using FromBlobFn = AOTITorchError (*)(void*, int64_t, const int64_t*, const int64_t*, int64_t, int32_t,
                                      int32_t, int32_t, AtenTensorHandle*, int32_t, const uint8_t*,
                                      int64_t, void (*)(void*, void*), void*);
FromBlobFn from_blob_with_deleter() {
  static const FromBlobFn fn =
      reinterpret_cast<FromBlobFn>(torch_symbol("torch_from_blob", "libtorch_cpu.so"));
  return fn;
}

// Freed output buffers, by size (a multiple of the huge page size), oldest
// evicted first. Buffers are anonymous mappings, so unused memory goes straight
// back to the OS on eviction. Leaked on purpose: tensors may be freed after
// static destructors ran.
class OutputCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = idle_.size(); i-- > 0;) {  // the most recently freed first: warm
        if (idle_[i].bytes == bytes) {
          void* p = idle_[i].ptr;
          idle_bytes_ -= bytes;
          idle_.erase(idle_.begin() + std::ptrdiff_t(i));
          return p;
        }
      }
    }
    // Map a huge page more than needed and trim both ends, so that the buffer
    // starts on a huge page boundary and every page of it can be a huge page.
    void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = round_up_to_huge_page(begin);
    if (aligned > begin) munmap(raw, aligned - begin);
    const uintptr_t tail = begin + kHugePage - aligned;  // what is mapped past aligned + bytes
    if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
    void* p = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
    if (huge_pages_enabled()) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    const size_t limit = output_cache_limit();
    if (bytes > limit) {  // would not fit even alone: keep the others
      munmap(p, bytes);
      return;
    }
    std::vector<Buffer> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle_.push_back(Buffer{p, bytes});
      idle_bytes_ += bytes;
      while (idle_bytes_ > limit && !idle_.empty()) {
        evicted.push_back(idle_.front());
        idle_bytes_ -= idle_.front().bytes;
        idle_.erase(idle_.begin());
      }
    }
    for (const Buffer& b : evicted) munmap(b.ptr, b.bytes);
  }

 private:
  struct Buffer {
    void* ptr;
    size_t bytes;
  };
  std::mutex mu_;
  std::vector<Buffer> idle_;
  size_t idle_bytes_ = 0;
};

OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();
  return *cache;
}

// Bytes per element of the dtypes tokcore's ops return (0: not cached).
size_t element_size(ScalarType type) {
  switch (type) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    case ScalarType::Byte:
    case ScalarType::Bool: return 1;
    default: return 0;
  }
}

void return_to_cache(void* data, void* ctx) { output_cache().give(data, reinterpret_cast<size_t>(ctx)); }

// Asks the kernel to back a large, not yet touched CPU output with transparent
// huge pages (where the output cache cannot serve it). A fresh 1 GiB output
// otherwise costs ~260k page faults, which take longer than the kernel that
// fills it (measured: 0.35 s of faults against 0.06 s to copy 1 GiB on the
// 2-core CI machine). A hint only: no effect on results, ignored where THP is
// off; TOKCORE_CPU_HUGE_PAGES=0 turns it off.
void advise_huge_pages(const Tensor& fresh_cpu_output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_enabled()) return;
  const uintptr_t nbytes = uintptr_t(fresh_cpu_output.numel()) * fresh_cpu_output.element_size();
  if (nbytes < 8 * kHugePage) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh_cpu_output.data_ptr());
  const uintptr_t first = round_up_to_huge_page(begin);
  const uintptr_t last = (begin + nbytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh_cpu_output;
#endif
}

}  // namespace

namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

}  // namespace

Tensor new_output(const char* op, const Tensor& like, std::initializer_list<int64_t> sizes,
                  std::optional<ScalarType> dtype) {
  const ScalarType type = dtype.value_or(like.scalar_type());
  std::vector<int64_t> shape(sizes);
  // Sizes come from arguments (max_len, total, offsets): a product past int64
  // must be an error here, not a wrapped-around size further down. Sizes of 0
  // count as 1, as in torch's strides, which must fit too.
  int64_t extent = 1, numel = 1;
  bool overflow = false;
  for (int64_t n : shape) {
    overflow = __builtin_mul_overflow(extent, std::max<int64_t>(n, 1), &extent) || overflow;
    numel = overflow ? 0 : numel * n;
  }
  const int64_t item = element_size(type) > 0 ? int64_t(element_size(type)) : 8;
  overflow = __builtin_mul_overflow(extent, item, &extent) || overflow;
  TOKCORE_CHECK(!overflow, op, "the output would have shape ", shape_string(shape),
                ", whose sizes or strides in bytes overflow int64");
  const int64_t nbytes = numel * item;
  if (like.is_cpu()) {
    const size_t bytes = size_t(numel) * element_size(type);
    const FromBlobFn from_blob = from_blob_with_deleter();
    if (bytes >= kCachedOutputMinBytes && from_blob != nullptr && output_cache_limit() > 0) {
      const size_t rounded = round_up_to_huge_page(bytes);
      if (void* p = output_cache().take(rounded)) {
        std::vector<int64_t> strides(shape.size());
        int64_t stride = 1;
        for (size_t i = shape.size(); i-- > 0;) {
          strides[i] = stride;
          stride *= shape[i];
        }
        AtenTensorHandle handle = nullptr;
        const AOTITorchError err = from_blob(
            p, int64_t(shape.size()), shape.data(), strides.data(), 0,
            torch::stable::detail::to<int32_t>(torch::stable::detail::from(type)),
            aoti_torch_device_type_cpu(), /*device_index=*/-1, &handle, aoti_torch_layout_strided(), nullptr, 0,
            &return_to_cache, reinterpret_cast<void*>(rounded));
        if (err == AOTI_TORCH_SUCCESS) return Tensor(handle);
        output_cache().give(p, rounded);
      }
    }
  }
  try {
    Tensor out = torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(shape), type);
    if (out.is_cpu()) advise_huge_pages(out);
    return out;
  } catch (const std::exception&) {  // torch's message through the stable ABI says only that it failed
    fail(op, "could not allocate the output of shape ", shape_string(shape), " (",
         double(nbytes) / 1e9, " GB)");
  }
}

Tensor contiguous_copy(const Tensor& t, const char* op, const char* arg) {
  try {
    return torch::stable::contiguous(t);
  } catch (const std::exception&) {  // torch's message through the stable ABI says only that it failed
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    fail(op, "could not copy ", arg, " of shape ", shape_string(shape), " into contiguous memory (",
         double(t.numel()) * double(element_size(t.scalar_type())) / 1e9, " GB)");
  }
}

ValidatedOffsets validated_offsets_cuda(const Tensor& offsets, OffsetsEnd end, void* stream,
                                        const char* op, const char* arg) {
  int64_t result[6] = {0, 0, -1, -1, 0, 0};  // see validate_offsets_cuda
  Tensor scratch = torch::stable::new_empty(offsets, {3});
  check_cuda(validate_offsets_cuda(offsets.const_data_ptr<int64_t>(), offsets.size(0), end.value,
                                   scratch.mutable_data_ptr<int64_t>(), result, stream),
             op);
  check_offsets_result({int(result[0]), result[3], result[4], result[5], result[1]}, end, op, arg);
  return ValidatedOffsets{result[1], result[2]};
}

int64_t check_offsets_cuda(const Tensor& offsets, OffsetsEnd end, void* stream, const char* op,
                           const char* arg) {
  if (!settings().cuda_check_offsets) return -1;
  return stream_is_capturing(stream, op) ? -1 : validated_offsets_cuda(offsets, end, stream, op, arg).longest;
}

void* current_cuda_stream(int32_t device_index) {
  // aoti_torch_get_current_cuda_stream lives in libtorch_cuda, which a CPU-only
  // torch lacks: linking against it would make the library fail to load there.
  using GetStreamFn = int32_t (*)(int32_t, void**);
  static GetStreamFn get_stream = []() -> GetStreamFn {
    void* sym = torch_symbol("aoti_torch_get_current_cuda_stream", "libtorch_cuda.so");
    return reinterpret_cast<GetStreamFn>(sym);
  }();
  STD_TORCH_CHECK(get_stream != nullptr,
                  "tokcore: torch has no CUDA support (aoti_torch_get_current_cuda_stream not found)");
  void* stream = nullptr;
  STD_TORCH_CHECK(get_stream(device_index, &stream) == 0,
                  "tokcore: could not get the current CUDA stream");
  return stream;
}

}  // namespace adapter
}  // namespace tokcore
