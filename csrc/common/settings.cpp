// The run-time switches: see tokcore/common/settings.h.
#include "tokcore/common/settings.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "tokcore/common/env.h"

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
  if (s == nullptr) {  // first use (python/tokcore/_library.py makes that the import)
    reload_settings();
    s = current.load(std::memory_order_acquire);
  }
  return *s;
}

}  // namespace tokcore
