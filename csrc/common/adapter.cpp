#include "adapter.h"

#include <dlfcn.h>

#include <cstdlib>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tokcore {
namespace adapter {

void advise_huge_pages(const Tensor& fresh_cpu_output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("TOKCORE_CPU_HUGE_PAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!enabled) return;
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const uintptr_t nbytes = uintptr_t(fresh_cpu_output.numel()) * fresh_cpu_output.element_size();
  if (nbytes < 8 * kHugePage) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh_cpu_output.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh_cpu_output;
#endif
}

void* current_cuda_stream(int32_t device_index) {
  // aoti_torch_get_current_cuda_stream lives in libtorch_cuda, which a CPU-only
  // torch lacks: linking against it would make the library fail to load there.
  using GetStreamFn = int32_t (*)(int32_t, void**);
  static GetStreamFn get_stream = []() -> GetStreamFn {
    void* sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    if (sym == nullptr) {
      void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
      if (lib != nullptr) sym = dlsym(lib, "aoti_torch_get_current_cuda_stream");
    }
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
