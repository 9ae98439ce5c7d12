// The run-time switches (README, "Run-time switches"), read from the environment
// once, at first use (python/tokcore/_library.py makes that the import), and again
// only on reload_settings() (tokcore.reload_settings() in Python): never by a
// kernel call. Ops run without Python's GIL, and getenv() in one thread while
// another changes the environment (os.environ[...] = ... in Python) can read a
// table that is being freed, and crash.
#pragma once

namespace tokcore {

struct Settings {
  int cpu_isa = -1;               // TOKCORE_CPU_ISA: 0 base, 1 avx2, 2 avx512; -1 unset or none of those
  long long stream_min_mb = 64;   // TOKCORE_CPU_STREAM_MIN_MB
  long long output_cache_mb = 2048;  // TOKCORE_CPU_OUTPUT_CACHE_MB (0: off)
  bool huge_pages = true;         // TOKCORE_CPU_HUGE_PAGES (anything but "0": on)
  bool cuda_check_offsets = true; // TOKCORE_CUDA_CHECK_OFFSETS (anything but "0": on)
};

// The settings the environment holds now (reads it: call only where nothing else
// changes it, as reload_settings' callers do).
Settings settings_from_environment();

// The settings in use: those of the environment at first use or at the last
// reload_settings(). Cheap (one atomic load), safe from any thread.
const Settings& settings();

// Reads the environment again; the next kernel calls use what it holds.
void reload_settings();

}  // namespace tokcore
