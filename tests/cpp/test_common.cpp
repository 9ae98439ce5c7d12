// Unit tests of the shared core pieces: 16-bit float conversions and offsets checks.
#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>

#include "tokcore/common/cpu_isa.h"
#include "tokcore/common/dtype.h"
#include "tokcore/common/env.h"
#include "tokcore/common/offsets.h"
#include "tokcore/common/settings.h"

using namespace tokcore;

TEST(DType, BFloat16KnownValues) {
  EXPECT_EQ(float_to_bf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0f).bits, 0xc000);
  EXPECT_EQ(bf16_to_float(bf16_t{0x3f80}), 1.0f);
  // 1 + 2^-8 is halfway between two bf16 values: ties go to even (1.0).
  EXPECT_EQ(float_to_bf16(1.00390625f).bits, 0x3f80);
  // 1 + 3 * 2^-8 is halfway as well: rounds up to the even neighbour 1 + 2^-6.
  EXPECT_EQ(float_to_bf16(1.01171875f).bits, 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()).bits, 0x7f80);
}

TEST(DType, Float16KnownValues) {
  EXPECT_EQ(float_to_f16(1.0f).bits, 0x3c00);
  EXPECT_EQ(float_to_f16(-2.0f).bits, 0xc000);
  EXPECT_EQ(float_to_f16(65504.0f).bits, 0x7bff);     // largest finite half
  EXPECT_EQ(float_to_f16(65520.0f).bits, 0x7c00);     // rounds to infinity
  EXPECT_EQ(float_to_f16(5.960464477539063e-8f).bits, 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_f16(2.98e-8f).bits, 0x0000);     // below half the smallest subnormal
  EXPECT_EQ(f16_to_float(f16_t{0x0001}), 5.960464477539063e-8f);
  EXPECT_EQ(f16_to_float(f16_t{0x3555}), 0.333251953125f);
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(std::nanf("")))));
}

TEST(DType, Float16RoundTripsEveryHalf) {
  // Every finite half converts to float and back to itself.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const f16_t h{uint16_t(bits)};
    const float f = f16_to_float(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_f16(f).bits, h.bits) << "bits " << bits;
  }
}

TEST(DType, BFloat16RoundTripsEveryValue) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const bf16_t h{uint16_t(bits)};
    const float f = bf16_to_float(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f).bits, h.bits) << "bits " << bits;
  }
}

TEST(Offsets, Validation) {
  const int64_t ok[] = {0, 2, 2, 5};
  EXPECT_EQ(check_offsets(ok, 4, 5), kOffsetsOk);
  EXPECT_EQ(check_offsets(ok, 4, -1), kOffsetsOk);
  EXPECT_EQ(check_offsets(ok, 4, 6), kOffsetsLastNotTotal);
  const int64_t first[] = {1, 2};
  EXPECT_EQ(check_offsets(first, 2, 2), kOffsetsFirstNotZero);
  const int64_t decreasing[] = {0, 3, 2, 5};
  EXPECT_EQ(check_offsets(decreasing, 4, 5), kOffsetsDecreasing);
  const int64_t single[] = {0};
  EXPECT_EQ(check_offsets(single, 1, 0), kOffsetsOk);
}

// Errors name the first failing entry, in the order the entries come.
TEST(Offsets, FirstFailureIsTheFirstBadEntry) {
  const int64_t ok[] = {0, 2, 2, 5};
  EXPECT_EQ(first_offsets_failure(ok, 4, 5).status, kOffsetsOk);
  EXPECT_EQ(first_offsets_failure(ok, 4, 5).index, -1);
  const int64_t two_drops[] = {0, 4, 3, 6, 1, 7};  // offsets[2] < offsets[1] comes first
  EXPECT_EQ(first_offsets_failure(two_drops, 6, 7).status, kOffsetsDecreasing);
  EXPECT_EQ(first_offsets_failure(two_drops, 6, 7).index, 1);
  const int64_t start_and_drop[] = {2, 1, 3};  // a bad start is entry 0, before the drop
  EXPECT_EQ(first_offsets_failure(start_and_drop, 3, 3).status, kOffsetsFirstNotZero);
  EXPECT_EQ(first_offsets_failure(start_and_drop, 3, 3).index, 0);
  const int64_t drop_and_end[] = {0, 5, 4, 9};  // a drop comes before a wrong end
  EXPECT_EQ(first_offsets_failure(drop_and_end, 4, 8).status, kOffsetsDecreasing);
  EXPECT_EQ(first_offsets_failure(drop_and_end, 4, 8).index, 1);
  const int64_t wrong_end[] = {0, 5, 9};
  EXPECT_EQ(first_offsets_failure(wrong_end, 3, 8).status, kOffsetsLastNotTotal);
  EXPECT_EQ(first_offsets_failure(wrong_end, 3, 8).index, 2);
}

// Counts in the environment: digits only, else the fallback (as _library.py warns).
TEST(Env, CountsAreDigitsOnly) {
  const char* name = "TOKCORE_TEST_ENV_COUNT";
  unsetenv(name);
  EXPECT_EQ(env_count(name, 7), 7);
  const std::pair<const char*, long long> cases[] = {
      {"", 7}, {"0", 0}, {"64", 64}, {"64MB", 7}, {"-1", 7}, {" 5", 7}, {"0x10", 7},
      {"99999999999999999999999", LLONG_MAX}};
  for (const auto& [value, expected] : cases) {
    setenv(name, value, 1);
    EXPECT_EQ(env_count(name, 7), expected) << "'" << value << "'";
  }
  unsetenv(name);
}

// The run-time switches: parsed as _library.py expects, and in use only after a reload.
TEST(Settings, ReadFromTheEnvironmentOnReloadOnly) {
  const char* names[] = {"TOKCORE_CPU_ISA", "TOKCORE_CPU_STREAM_MIN_MB", "TOKCORE_CPU_OUTPUT_CACHE_MB",
                         "TOKCORE_CPU_HUGE_PAGES", "TOKCORE_CUDA_CHECK_OFFSETS"};
  for (const char* name : names) unsetenv(name);
  const Settings defaults = settings_from_environment();
  EXPECT_EQ(defaults.cpu_isa, -1);
  EXPECT_EQ(defaults.stream_min_mb, 64);
  EXPECT_EQ(defaults.output_cache_mb, 2048);
  EXPECT_TRUE(defaults.huge_pages);
  EXPECT_TRUE(defaults.cuda_check_offsets);
  reload_settings();
  setenv("TOKCORE_CPU_ISA", "avx2", 1);
  setenv("TOKCORE_CPU_STREAM_MIN_MB", "0", 1);
  setenv("TOKCORE_CPU_OUTPUT_CACHE_MB", "12", 1);
  setenv("TOKCORE_CPU_HUGE_PAGES", "0", 1);
  setenv("TOKCORE_CUDA_CHECK_OFFSETS", "0", 1);
  EXPECT_EQ(settings().cpu_isa, -1);  // not yet
  EXPECT_EQ(settings().stream_min_mb, 64);
  reload_settings();
  EXPECT_EQ(settings().cpu_isa, 1);
  EXPECT_EQ(settings().stream_min_mb, 0);
  EXPECT_EQ(settings().output_cache_mb, 12);
  EXPECT_FALSE(settings().huge_pages);
  EXPECT_FALSE(settings().cuda_check_offsets);
  setenv("TOKCORE_CPU_ISA", "AVX2", 1);  // not a name: unset
  setenv("TOKCORE_CPU_STREAM_MIN_MB", "64MB", 1);  // not a count: the default
  setenv("TOKCORE_CPU_HUGE_PAGES", "1", 1);
  reload_settings();
  EXPECT_EQ(settings().cpu_isa, -1);
  EXPECT_EQ(settings().stream_min_mb, 64);
  EXPECT_TRUE(settings().huge_pages);
  for (const char* name : names) unsetenv(name);
  reload_settings();
}

// The variant for a row: the widest whose vectors hold at least 7/8 of it, else the
// one holding most (the wider on a tie); never wider than the cap.
TEST(CpuIsa, RowWidthPicksTheVariant) {
  const int64_t f32[3] = {4, 8, 16};  // base, AVX2, AVX-512 lanes
  const int64_t bf16[3] = {8, 16, 32};
  const int64_t f16[3] = {0, 8, 16};  // the baseline build converts f16 lane by lane
  const CpuIsa top = CpuIsa::kAvx512;
  EXPECT_EQ(isa_for_row(top, 256, f32), CpuIsa::kAvx512);
  EXPECT_EQ(isa_for_row(top, 100, f32), CpuIsa::kAvx512);  // 96 of 100 in 16-lane vectors
  EXPECT_EQ(isa_for_row(top, 40, f32), CpuIsa::kAvx2);     // 32 of 40 < 7/8; AVX2 holds all
  EXPECT_EQ(isa_for_row(top, 8, f32), CpuIsa::kAvx2);
  EXPECT_EQ(isa_for_row(top, 12, f32), CpuIsa::kBase);
  EXPECT_EQ(isa_for_row(top, 7, f32), CpuIsa::kBase);      // none reaches 7/8: base holds most (4)
  EXPECT_EQ(isa_for_row(top, 3, f32), CpuIsa::kAvx512);    // no vector anywhere: the widest
  EXPECT_EQ(isa_for_row(top, 24, bf16), CpuIsa::kBase);
  EXPECT_EQ(isa_for_row(top, 48, bf16), CpuIsa::kAvx2);
  EXPECT_EQ(isa_for_row(top, 24, f16), CpuIsa::kAvx2);
  EXPECT_EQ(isa_for_row(top, 4, f16), CpuIsa::kAvx512);    // base has no f16 vectors
  EXPECT_EQ(isa_for_row(CpuIsa::kAvx2, 256, f32), CpuIsa::kAvx2);  // the cap holds
  EXPECT_EQ(isa_for_row(CpuIsa::kBase, 8, f32), CpuIsa::kBase);
  EXPECT_EQ(isa_for_row(top, 0, f32), CpuIsa::kAvx512);
}
