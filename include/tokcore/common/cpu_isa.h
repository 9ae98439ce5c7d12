// Run-time choice of the CPU instruction set for kernels that are built more
// than once (see CMakeLists.txt: tokcore_cpu_isa_variant). TOKCORE_CPU_ISA=base,
// avx2 or avx512 caps the choice (the tests use it to cover every variant); the
// CPU's own support always caps it too.
#pragma once

#include <cstdlib>
#include <cstring>

namespace tokcore {

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The best variant this CPU (and its OS, which must save the wide registers) runs.
inline CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBase;
}

// Read on every call (cheap next to any kernel) so tests can switch variants.
inline CpuIsa cpu_isa() {
  static const CpuIsa supported = cpu_isa_supported();
  CpuIsa cap = CpuIsa::kAvx512;
  if (const char* forced = std::getenv("TOKCORE_CPU_ISA")) {
    if (std::strcmp(forced, "base") == 0) cap = CpuIsa::kBase;
    else if (std::strcmp(forced, "avx2") == 0) cap = CpuIsa::kAvx2;
  }
  return static_cast<int>(cap) < static_cast<int>(supported) ? cap : supported;
}

}  // namespace tokcore
