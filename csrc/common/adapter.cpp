#include "adapter.h"

#include <dlfcn.h>

namespace tokcore {
namespace adapter {

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
