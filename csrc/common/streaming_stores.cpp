// use_streaming_stores (tokcore/common/streaming_stores.h), out of line: built with
// the baseline flags only (not per instruction set), so one copy serves every kernel
// variant.
#include "tokcore/common/streaming_stores.h"

#include <algorithm>
#include <cstdint>

#include "tokcore/common/settings.h"

namespace tokcore {

bool use_streaming_stores(const void* out, int64_t output_bytes, int64_t row_bytes) {
#if defined(__SSE2__)
  // (a threshold past 2^40 MB: never, without overflow)
  const int64_t min_bytes = int64_t(std::min<long long>(settings().stream_min_mb, 1LL << 40)) << 20;
  return output_bytes >= min_bytes && reinterpret_cast<uintptr_t>(out) % kCacheLineBytes == 0 &&
         row_bytes % kCacheLineBytes == 0;
#else
  (void)out, (void)output_bytes, (void)row_bytes;
  return false;
#endif
}

}  // namespace tokcore
