// Validation of CSR offsets (offsets[0] = 0, non-decreasing, last = total),
// written once for the CPU adapters, the CUDA validation kernel and the tests.
#pragma once

#include <cstdint>

#include "tokcore/common/macros.h"

namespace tokcore {

enum OffsetsStatus : int {
  kOffsetsOk = 0,
  kOffsetsFirstNotZero = 1,
  kOffsetsDecreasing = 2,
  kOffsetsLastNotTotal = 3,
};

// Checks the pair (offsets[i], offsets[i+1]) for i in [0, n-1) plus the ends.
// total < 0 means "any total" (the caller derives it from offsets[n-1]).
TOKCORE_HD int check_offsets_entry(const int64_t* offsets, int64_t n, int64_t i, int64_t total) {
  if (i == 0 && offsets[0] != 0) return kOffsetsFirstNotZero;
  if (i + 1 < n && offsets[i + 1] < offsets[i]) return kOffsetsDecreasing;
  if (i == n - 1 && total >= 0 && offsets[i] != total) return kOffsetsLastNotTotal;
  return kOffsetsOk;
}

// The first failing entry: its status and index i (for kOffsetsDecreasing,
// offsets[i + 1] < offsets[i]); {kOffsetsOk, -1} when every entry passes. Errors
// name the entry, so a user finds the bad one among millions.
struct OffsetsFailure {
  int status;
  int64_t index;
};

inline OffsetsFailure first_offsets_failure(const int64_t* offsets, int64_t n, int64_t total) {
  for (int64_t i = 0; i < n; ++i) {
    const int status = check_offsets_entry(offsets, n, i, total);
    if (status != kOffsetsOk) return OffsetsFailure{status, i};
  }
  return OffsetsFailure{kOffsetsOk, -1};
}

inline int check_offsets(const int64_t* offsets, int64_t n, int64_t total) {
  return first_offsets_failure(offsets, n, total).status;
}

}  // namespace tokcore
