// Run-time choice of the CPU instruction set for kernels that are built more
// than once (see CMakeLists.txt: tokcore_cpu_isa_variant). TOKCORE_CPU_ISA=base,
// avx2 or avx512 picks the variant (the tests use it to cover every variant); the
// CPU's own support always caps it. Unset, each call may take a narrower variant
// than the widest the CPU runs when its rows fit that one's vectors better
// (isa_for_row).
#pragma once

#include <cstdint>

#include "tokcore/common/settings.h"

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

// Whether TOKCORE_CPU_ISA names a variant (an invalid value is warned about at
// import and ignored).
inline bool cpu_isa_forced() { return settings().cpu_isa >= 0; }

// The widest variant allowed: the CPU's best, or the one TOKCORE_CPU_ISA names if
// the CPU runs it (read at import or tokcore.reload_settings(), so tests can switch
// variants).
inline CpuIsa cpu_isa() {
  static const CpuIsa supported = cpu_isa_supported();
  const int forced = settings().cpu_isa;
  const CpuIsa cap = forced >= 0 ? static_cast<CpuIsa>(forced) : CpuIsa::kAvx512;
  return static_cast<int>(cap) < static_cast<int>(supported) ? cap : supported;
}

// The variant for rows of D features, at most `cap`: the widest whose whole vectors
// (lanes[isa] features each; 0 where that build has none for the dtype) hold at
// least 7/8 of a row, else the one whose vectors hold most of it (the wider on a
// tie). The rest of a row goes through scalar code, which on the 2-core Zen 5 VM
// made the AVX-512 build up to 9x slower than a narrower one whose vectors fit the row:
// bf16 D = 24, max backward 3.9 GB/s (base: 29.3); f32 D = 8, 6.5 GB/s (AVX2: 34.6).
inline CpuIsa isa_for_row(CpuIsa cap, int64_t D, const int64_t lanes[3]) {
  if (D <= 0) return cap;
  CpuIsa best = cap;
  int64_t best_covered = -1;
  for (int isa = static_cast<int>(cap); isa >= 0; --isa) {
    const int64_t n = lanes[isa];
    const int64_t covered = n > 0 ? D - D % n : 0;  // features in whole vectors
    if (8 * covered >= 7 * D) return static_cast<CpuIsa>(isa);
    if (covered > best_covered) {
      best = static_cast<CpuIsa>(isa);
      best_covered = covered;
    }
  }
  return best;
}

}  // namespace tokcore
