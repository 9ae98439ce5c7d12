// The run-time switches: see tokcore/common/settings.h; and use_streaming_stores,
// which reads one. Built with the baseline flags only (not per instruction set), so
// one copy serves every kernel variant.
#include "tokcore/common/settings.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "tokcore/common/env.h"
#include "tokcore/common/streaming_stores.h"

namespace tokcore {

namespace {

bool is_zero(const char* value) { return value != nullptr && std::strcmp(value, "0") == 0; }

std::atomic<const Settings*> current{nullptr};
std::mutex reload_mutex;

}  // namespace

Settings settings_from_environment() {
  Settings s;
  if (const char* isa = std::getenv("TOKCORE_CPU_ISA")) {
    if (std::strcmp(isa, "base") == 0) s.cpu_isa = 0;
    else if (std::strcmp(isa, "avx2") == 0) s.cpu_isa = 1;
    else if (std::strcmp(isa, "avx512") == 0) s.cpu_isa = 2;
  }
  s.stream_min_mb = env_count("TOKCORE_CPU_STREAM_MIN_MB", s.stream_min_mb);
  s.output_cache_mb = env_count("TOKCORE_CPU_OUTPUT_CACHE_MB", s.output_cache_mb);
  s.huge_pages = !is_zero(std::getenv("TOKCORE_CPU_HUGE_PAGES"));
  s.cuda_check_offsets = !is_zero(std::getenv("TOKCORE_CUDA_CHECK_OFFSETS"));
  return s;
}

void reload_settings() {
  std::lock_guard<std::mutex> lock(reload_mutex);
  // The previous settings are leaked on purpose: a kernel in another thread may
  // still be reading them, and a reload is rare (a few dozen bytes each).
  current.store(new Settings(settings_from_environment()), std::memory_order_release);
}

const Settings& settings() {
  const Settings* s = current.load(std::memory_order_acquire);
  if (s == nullptr) {
    {
      std::lock_guard<std::mutex> lock(reload_mutex);
      if (current.load(std::memory_order_acquire) == nullptr)
        current.store(new Settings(settings_from_environment()), std::memory_order_release);
    }
    s = current.load(std::memory_order_acquire);
  }
  return *s;
}

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
