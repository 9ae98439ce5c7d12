// Ops that describe the build and the machine rather than compute: their
// results go into benchmark and bug reports (python/tokcore/__init__.py); and
// the entry point that re-reads the run-time settings.
#include <cstdint>

#include "adapter.h"
#include "tokcore/common/cpu_isa.h"
#include "tokcore/common/settings.h"

namespace tokcore {
namespace {

// The instruction set of the CPU kernels built per ISA that this process runs:
// 0 baseline x86-64 (or a non-x86 build), 1 AVX2, 2 AVX-512 (TOKCORE_CPU_ISA caps it).
int64_t cpu_isa_level() {
#if defined(TOKCORE_HAVE_X86_ISA_KERNELS)
  return static_cast<int64_t>(cpu_isa());
#else
  return 0;
#endif
}

}  // namespace
}  // namespace tokcore

// No tensor arguments, so no backend to dispatch on: one kernel for every key.
STABLE_TORCH_LIBRARY_IMPL(tokcore, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa_level", TORCH_BOX(&tokcore::cpu_isa_level));
}

// tokcore.reload_settings() calls this through ctypes.PyDLL, which keeps the GIL:
// no Python thread can change the environment while it is read. (A torch op would
// run without the GIL.) Exported by name: the library hides its other symbols.
extern "C" __attribute__((visibility("default"))) void tokcore_reload_settings() {
  tokcore::reload_settings();
}
