// Run-time settings read from the environment (README, "Run-time switches"), with
// one rule for every count: digits only, else the fallback. python/tokcore/_library.py
// warns at import about a value that falls back, so a typo does not pass unnoticed.
#pragma once

#include <climits>
#include <cstdlib>

namespace tokcore {

// The whole number in environment variable `name` (saturating at LLONG_MAX), or
// `fallback` when it is unset, empty or not all digits ("64MB", "-1", "x").
inline long long env_count(const char* name, long long fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  long long value = 0;
  for (const char* p = env; *p != '\0'; ++p) {
    if (*p < '0' || *p > '9') return fallback;
    value = value > (LLONG_MAX - 9) / 10 ? LLONG_MAX : value * 10 + (*p - '0');
  }
  return value;
}

}  // namespace tokcore
