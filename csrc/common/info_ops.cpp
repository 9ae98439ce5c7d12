// Ops that describe the build and the machine rather than compute: their
// results go into benchmark and bug reports (python/tokcore/__init__.py).
#include <cstdint>

#include "adapter.h"
#include "tokcore/common/cpu_isa.h"

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
