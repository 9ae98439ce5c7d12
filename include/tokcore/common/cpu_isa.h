// Run-time choice of the CPU instruction set for kernels that are built more
// than once (see CMakeLists.txt: tokcore_cpu_isa_variants). TOKCORE_CPU_ISA=base
// forces the baseline build (used by the tests to cover both variants).
#pragma once

#include <cstdlib>
#include <cstring>

namespace tokcore {

enum class CpuIsa { kBase, kAvx2 };

inline bool cpu_supports_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Read on every call (cheap next to any kernel) so tests can switch variants.
inline CpuIsa cpu_isa() {
  const char* forced = std::getenv("TOKCORE_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "base") == 0) return CpuIsa::kBase;
  static const bool has_avx2 = cpu_supports_avx2_fma();
  return has_avx2 ? CpuIsa::kAvx2 : CpuIsa::kBase;
}

}  // namespace tokcore
