// Unit tests of the pooling core and its CPU kernels, with a serial runtime.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "pooling/pooling_cpu_segments.h"
#include "pooling/pooling_cpu_words.h"
#include "pooling/pooling_kernels.h"
#include "tokcore/common/cpu_isa.h"

using namespace tokcore;
using namespace tokcore::pooling;

namespace {

std::vector<std::string> split(const std::string& text, int64_t max_bytes = 16,
                               WordMode mode = WordMode::kSpace) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  const int64_t cu[2] = {0, int64_t(text.size())};
  std::vector<int64_t> starts;
  if (!text.empty())
    for_each_word_start(bytes, cu, 1, 0, int64_t(text.size()), max_bytes, mode,
                        [&](int64_t p) { starts.push_back(p); });
  starts.push_back(int64_t(text.size()));
  std::vector<std::string> words;
  for (size_t i = 0; i + 1 < starts.size(); ++i)
    words.push_back(text.substr(size_t(starts[i]), size_t(starts[i + 1] - starts[i])));
  return words;
}

using Words = std::vector<std::string>;

}  // namespace

TEST(WordBoundaries, ByteClasses) {
  EXPECT_EQ(byte_class(' '), kWhitespace);
  EXPECT_EQ(byte_class('\v'), kWhitespace);
  EXPECT_EQ(byte_class('_'), kWordByte);
  EXPECT_EQ(byte_class(0x80), kWordByte);
  EXPECT_EQ(byte_class('!'), kPunct);
  EXPECT_EQ(byte_class(0x00), kPunct);
}

TEST(WordBoundaries, SpaceRule) {
  EXPECT_EQ(split("Hello, world!"), (Words{"Hello,", " world!"}));
  EXPECT_EQ(split(" ,foo"), (Words{" ,", "foo"}));
  EXPECT_EQ(split("a  b"), (Words{"a", "  b"}));
  EXPECT_EQ(split("x=y+1"), (Words{"x=", "y+", "1"}));
  EXPECT_EQ(split("\n\n\tdef f():"), (Words{"\n\n\tdef", " f():"}));
}

TEST(WordBoundaries, CutsLongWordsAtCharacterStarts) {
  EXPECT_EQ(split("abcdefghij", 4), (Words{"abcd", "efgh", "ij"}));
  // "é" is 2 bytes (0xC3 0xA9): the cut goes before a character, never inside one.
  EXPECT_EQ(split("abc\xC3\xA9" "def", 4), (Words{"abc", "\xC3\xA9" "de", "f"}));
  // Invalid UTF-8 (only continuation bytes): cut at the limit.
  EXPECT_EQ(split("\x80\x80\x80\x80\x80\x80", 4), (Words{"\x80\x80\x80\x80", "\x80\x80"}));
}

TEST(WordBoundaries, BytesMode) {
  EXPECT_EQ(split("ab c", 4, WordMode::kBytes), (Words{"a", "b", " ", "c"}));
}

TEST(WordBoundaries, ChunkingDoesNotChangeTheResult) {
  // Any split of the stream into ranges gives the same words as one range:
  // the property that the parallel CPU and CUDA kernels rely on.
  std::mt19937 rng(7);
  const char alphabet[] = "ab ,.\n\xC3\xA9\x80_9";
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int n = 1 + int(rng() % 80);
    for (int i = 0; i < n; ++i) text.push_back(alphabet[rng() % (sizeof(alphabet) - 1)]);
    const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
    const int64_t mid = int64_t(rng() % text.size());
    const int64_t cu[4] = {0, mid, mid, int64_t(text.size())};  // with an empty sequence
    std::vector<int64_t> whole, pieces;
    for_each_word_start(bytes, cu, 3, 0, int64_t(text.size()), 5, WordMode::kSpace,
                        [&](int64_t p) { whole.push_back(p); });
    for (int64_t lo = 0; lo < int64_t(text.size()); lo += 3)
      for_each_word_start(bytes, cu, 3, lo, std::min<int64_t>(lo + 3, text.size()), 5,
                          WordMode::kSpace, [&](int64_t p) { pieces.push_back(p); });
    ASSERT_EQ(whole, pieces) << "text '" << text << "'";
    ASSERT_EQ(whole.front(), 0);
    ASSERT_TRUE(std::find(whole.begin(), whole.end(), mid) != whole.end() || mid == 0);
  }
}

TEST(WordBoundaries, CpuKernelCountsAndFills) {
  const std::string text = "one two\nthree, four";
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  const int64_t cu[3] = {0, 8, int64_t(text.size())};
  Runtime rt;
  std::vector<int64_t> counts(num_word_chunks(int64_t(text.size()), kWordChunkBytesCpu));
  const int64_t W = word_boundaries_count_cpu(rt, bytes, cu, 2, 16, WordMode::kSpace, counts.data());
  ASSERT_EQ(W, 5);
  std::vector<int64_t> offsets(W + 1), word_cu(3);
  word_boundaries_fill_cpu(rt, bytes, cu, 2, 16, WordMode::kSpace, counts.data(), W, offsets.data(),
                           word_cu.data());
  // Sequence 0 "one two\n": "one", " two", "\n"; sequence 1 "three, four": "three,", " four".
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 3, 7, 8, 14, 19}));
  EXPECT_EQ(word_cu, (std::vector<int64_t>{0, 3, 5}));
}

// Bytes that change between the count and the fill (another thread writing to
// them during the call): the fill says so, and writes nothing past its output.
TEST(WordBoundaries, CpuFillNeverWritesPastTheCountedWords) {
  const int64_t n = 3 * kWordChunkBytesCpu;  // three chunks
  const std::string few(size_t(n), 'a');    // words cut at max_bytes only
  std::string many = few, fewer = few;
  for (int64_t i = kWordChunkBytesCpu; i < 2 * kWordChunkBytesCpu; i += 2) many[size_t(i)] = ' ';
  for (int64_t i = 0; i < n; i += 2) fewer[size_t(i)] = ' ';  // counted on this one below
  const int64_t cu[2] = {0, n};
  Runtime rt;
  const auto fill = [&](const std::string& counted, const std::string& filled, bool expect_ok) {
    std::vector<int64_t> counts(num_word_chunks(n, kWordChunkBytesCpu));
    const int64_t W = word_boundaries_count_cpu(rt, reinterpret_cast<const uint8_t*>(counted.data()), cu, 1, 16,
                                                WordMode::kSpace, counts.data());
    const int64_t kGuard = 1 << 16, kSentinel = -12345;
    std::vector<int64_t> offsets(size_t(W + 1 + kGuard), kSentinel), word_cu(2);
    const bool ok = word_boundaries_fill_cpu(rt, reinterpret_cast<const uint8_t*>(filled.data()), cu, 1, 16,
                                             WordMode::kSpace, counts.data(), W, offsets.data(), word_cu.data());
    EXPECT_EQ(ok, expect_ok);
    for (int64_t i = W + 1; i < W + 1 + kGuard; ++i) ASSERT_EQ(offsets[size_t(i)], kSentinel) << "written past";
  };
  fill(few, few, true);
  fill(few, many, false);    // more words than counted: each chunk stops at its slots
  fill(fewer, few, false);   // fewer words than counted
}

namespace {

template <Reduce R>
std::vector<float> naive_reduce(const std::vector<float>& x, const std::vector<int64_t>& off, int64_t D) {
  std::vector<float> y((off.size() - 1) * D, 0.0f);
  for (size_t s = 0; s + 1 < off.size(); ++s)
    for (int64_t d = 0; d < D; ++d) {
      if (off[s] == off[s + 1]) continue;
      float acc = x[off[s] * D + d];
      for (int64_t t = off[s] + 1; t < off[s + 1]; ++t) {
        const float v = x[t * D + d];
        if (R == Reduce::kSum || R == Reduce::kMean) acc += v;
        if (R == Reduce::kMax) acc = std::max(acc, v);
        if (R == Reduce::kMin) acc = std::min(acc, v);
      }
      if (R == Reduce::kMean) acc /= float(off[s + 1] - off[s]);
      y[s * D + d] = acc;
    }
  return y;
}

}  // namespace

TEST(SegmentReduce, MatchesNaiveLoops) {
  const int64_t D = 300;  // crosses the 256-feature tile of the CPU kernel
  const std::vector<int64_t> off = {0, 1, 1, 4, 9};
  std::vector<float> x(9 * D);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (auto& v : x) v = dist(rng);
  Runtime rt;
  std::vector<float> y(4 * D);
  segment_reduce_cpu(rt, DType::kFloat32, x.data(), off.data(), 4, 9, D, Reduce::kMean, y.data());
  const auto mean = naive_reduce<Reduce::kMean>(x, off, D);
  for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], mean[i], 1e-6f);
  segment_reduce_cpu(rt, DType::kFloat32, x.data(), off.data(), 4, 9, D, Reduce::kMax, y.data());
  EXPECT_EQ(y, naive_reduce<Reduce::kMax>(x, off, D));
  segment_reduce_cpu(rt, DType::kFloat32, x.data(), off.data(), 4, 9, D, Reduce::kMin, y.data());
  EXPECT_EQ(y, naive_reduce<Reduce::kMin>(x, off, D));
}

TEST(SegmentReduce, MaxPropagatesNanAndBackwardPicksFirst) {
  const std::vector<int64_t> off = {0, 4};
  const std::vector<float> x = {1.0f, 3.0f, 3.0f, 2.0f};
  Runtime rt;
  float y = 0;
  segment_reduce_cpu(rt, DType::kFloat32, x.data(), off.data(), 1, 4, 1, Reduce::kMax, &y);
  EXPECT_EQ(y, 3.0f);
  const float g = 5.0f;
  std::vector<float> gx(4, -1.0f);
  segment_reduce_backward_cpu(rt, DType::kFloat32, &g, x.data(), &y, off.data(), 1, 4, 1, Reduce::kMax,
                              gx.data());
  EXPECT_EQ(gx, (std::vector<float>{0.0f, 5.0f, 0.0f, 0.0f}));
  const std::vector<float> with_nan = {1.0f, std::nanf(""), 7.0f, std::nanf("")};
  segment_reduce_cpu(rt, DType::kFloat32, with_nan.data(), off.data(), 1, 4, 1, Reduce::kMax, &y);
  EXPECT_TRUE(std::isnan(y));
  segment_reduce_backward_cpu(rt, DType::kFloat32, &g, with_nan.data(), &y, off.data(), 1, 4, 1,
                              Reduce::kMax, gx.data());
  EXPECT_EQ(gx, (std::vector<float>{0.0f, 5.0f, 0.0f, 0.0f}));
}

TEST(SegmentReduce, BFloat16AccumulatesInFloat) {
  // 256 copies of 1 + 2^-7: a bf16 running sum would stall, a float one does not.
  const int64_t T = 256;
  std::vector<bf16_t> x(T, float_to_bf16(1.0078125f));
  const std::vector<int64_t> off = {0, T};
  bf16_t y;
  Runtime rt;
  segment_reduce_cpu(rt, DType::kBFloat16, x.data(), off.data(), 1, T, 1, Reduce::kSum, &y);
  EXPECT_EQ(bf16_to_float(y), 258.0f);
}

TEST(SegmentPack, PackUnpackRoundTripAndTruncation) {
  const std::vector<int64_t> off = {0, 2, 2, 7};
  std::vector<double> x(7 * 2);
  for (size_t i = 0; i < x.size(); ++i) x[i] = double(i + 1);
  Runtime rt;
  const int64_t L = 3;
  std::vector<double> packed(3 * L * 2, -1.0);
  segment_pack_cpu(rt, DType::kFloat64, x.data(), off.data(), 3, 7, 2, L, packed.data());
  EXPECT_EQ(packed, (std::vector<double>{1, 2, 3, 4, 0, 0,  0, 0, 0, 0, 0, 0,  5, 6, 7, 8, 9, 10}));
  std::vector<double> back(7 * 2, -1.0);
  segment_unpack_cpu(rt, DType::kFloat64, packed.data(), off.data(), 3, 7, 2, L, back.data());
  EXPECT_EQ(back, (std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0, 0}));
  std::vector<double> y = {1, 2, 3, 4, 5, 6}, expanded(14);
  segment_expand_cpu(rt, DType::kFloat64, y.data(), off.data(), 3, 7, 2, expanded.data());
  EXPECT_EQ(expanded, (std::vector<double>{1, 2, 1, 2, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6}));
}

TEST(SegmentParts, LongSegmentsCutIntoPiecesGiveTheSameRows) {
  // A runtime that claims 8 threads (its parallel_for is serial) cuts segments of
  // at least shared_segment_rows rows into pieces of kSharedPieceRows; every op that
  // writes rows per segment must give what one thread gives, piece edges included.
  std::mt19937 rng(21);
  std::vector<int64_t> off = {0};
  for (int64_t length : {3, 0, 5000, 7, 1, 2049, 4, 0, 1024, 9}) off.push_back(off.back() + length);
  const int64_t S = int64_t(off.size()) - 1, T = off.back(), D = 5, L = 3000;
  ASSERT_GE(5000, shared_segment_rows(8, T));  // the long ones are shared
  ASSERT_LT(9, shared_segment_rows(8, T));     // the words are not
  std::normal_distribution<double> normal;
  std::vector<double> x(size_t(T * D)), y(size_t(S * D)), packed(size_t(S * L * D));
  for (auto* v : {&x, &y, &packed})
    for (double& e : *v) e = normal(rng);
  Runtime one, eight;
  eight.threads = 8;
  const auto both = [&](size_t n, auto&& run) {
    std::vector<double> a(n, -1.0), b(n, -2.0);  // different fills: an unwritten element shows
    run(one, a.data());
    run(eight, b.data());
    EXPECT_EQ(a, b);
  };
  both(size_t(T * D), [&](const Runtime& rt, double* out) {
    segment_expand_cpu(rt, DType::kFloat64, y.data(), off.data(), S, T, D, out);
  });
  both(size_t(S * L * D), [&](const Runtime& rt, double* out) {
    segment_pack_cpu(rt, DType::kFloat64, x.data(), off.data(), S, T, D, L, out);
  });
  both(size_t(T * D), [&](const Runtime& rt, double* out) {
    segment_unpack_cpu(rt, DType::kFloat64, packed.data(), off.data(), S, T, D, L, out);
  });
  for (Reduce r : {Reduce::kSum, Reduce::kMean}) {
    both(size_t(T * D), [&](const Runtime& rt, double* out) {
      segment_reduce_backward_cpu(rt, DType::kFloat64, y.data(), nullptr, nullptr, off.data(), S, T, D, r, out);
    });
  }
}

namespace {
// A parallel_for that cuts [begin, end) into pieces of g_piece and runs them last
// first: a run of stores that spilled into another task's rows would be
// overwritten (or left wrong) where the tasks' order matters.
int64_t g_piece = 1;
void pieces_last_first(int64_t begin, int64_t end, int64_t, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  for (int64_t hi = end; hi > begin;) {
    const int64_t lo = std::max(begin, hi - g_piece);
    body(ctx, lo, hi);
    hi = lo;
  }
}

// Expand and the sum/mean backward on rows of 2 to 32 bytes (fill_narrow_rows)
// against a loop over the rows, for row ranges cut anywhere.
template <typename T>
void check_narrow_rows(DType dtype, int64_t D) {
  SCOPED_TRACE("dtype " + std::to_string(int(dtype)) + ", D " + std::to_string(D));
  ASSERT_TRUE(narrow_rows(D * int64_t(sizeof(T))));
  std::mt19937 rng(int(D) * 7 + int(sizeof(T)));
  std::vector<int64_t> off = {0};
  std::uniform_int_distribution<int> word(1, 9), kind(0, 19);
  while (off.size() < 400) {  // words, empty segments, runs a little longer than a run, long segments
    const int k = kind(rng);
    const int64_t length = k == 0 ? 0 : k == 1 ? 15 + word(rng) : k == 2 ? 40 * word(rng) : word(rng);
    off.push_back(off.back() + length);
  }
  off.push_back(off.back());  // an empty last segment
  const int64_t S = int64_t(off.size()) - 1, T_ = off.back();
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  std::vector<T> y(size_t(S * D));
  for (auto& v : y) v = from_acc<T>(acc_t<T>(dist(rng)));
  for (Reduce r : {Reduce::kMean, Reduce::kSum}) {
    std::vector<T> expected(size_t(T_ * D));  // mean: divided by the length; sum/expand: copied
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t t = off[s]; t < off[s + 1]; ++t)
        for (int64_t j = 0; j < D; ++j)
          expected[t * D + j] = r == Reduce::kSum ? y[s * D + j] : from_acc<T>(to_acc(y[s * D + j]) / acc_t<T>(off[s + 1] - off[s]));
    }
    for (int64_t piece : {int64_t(1), int64_t(7), int64_t(16), int64_t(17), int64_t(1000), T_}) {
      g_piece = piece;
      Runtime rt;
      rt.parallel_for = &pieces_last_first;
      rt.threads = 2;
      std::vector<T> grad(size_t(T_ * D), from_acc<T>(acc_t<T>(-7)));
      segment_reduce_backward_cpu(rt, dtype, y.data(), nullptr, nullptr, off.data(), S, T_, D, r, grad.data());
      EXPECT_EQ(0, std::memcmp(grad.data(), expected.data(), grad.size() * sizeof(T)))
          << "backward, pieces " << piece;
      if (r == Reduce::kSum) {
        std::vector<T> expanded(size_t(T_ * D), from_acc<T>(acc_t<T>(-7)));
        segment_expand_cpu(rt, dtype, y.data(), off.data(), S, T_, D, expanded.data());
        EXPECT_EQ(0, std::memcmp(expanded.data(), expected.data(), expanded.size() * sizeof(T)))
            << "expand, pieces " << piece;
      }
    }
  }
}
}  // namespace

TEST(SegmentParts, NarrowRowsMatchRowByRowForRangesCutAnywhere) {
  for (int64_t D : {1, 2, 4, 8}) check_narrow_rows<float>(DType::kFloat32, D);
  for (int64_t D : {1, 2, 4, 8, 16}) check_narrow_rows<bf16_t>(DType::kBFloat16, D);
  for (int64_t D : {1, 2, 4, 8, 16}) check_narrow_rows<f16_t>(DType::kFloat16, D);
  for (int64_t D : {1, 2, 4}) check_narrow_rows<double>(DType::kFloat64, D);
}

#if defined(TOKCORE_HAVE_X86_ISA_KERNELS)
namespace {
// A quiet NaN of T with a payload from `bits`.
template <typename T> T quiet_nan_with_payload(uint32_t bits);
template <> float quiet_nan_with_payload<float>(uint32_t bits) {
  const uint32_t b = 0x7fc00000u | (bits & 0xffffu);
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
template <> bf16_t quiet_nan_with_payload<bf16_t>(uint32_t bits) {
  return bf16_t{uint16_t(0x7fc0u | (bits & 0x3fu))};
}
template <> f16_t quiet_nan_with_payload<f16_t>(uint32_t bits) {
  return f16_t{uint16_t(0x7e00u | (bits & 0x1ffu))};
}

// The AVX-512 build reduces rows of 1, 2, 4 or 8 features (f32, bf16, f16) of 16
// bytes at most 16 words at a time through transposes of whole rows
// (pooling_cpu_reduce.cpp), f32 D = 8 row by row; the baseline build row by row. Same bits for every reduce: NaNs with payloads (max/min keep
// the first), infinities, -0.0, ties, empty words, words of 16 and 17 rows (the
// transpose's edge), words past a block (kReduceBlockRows) and one long enough to
// be shared over threads, groups of 16 words cut anywhere into tasks.
template <typename T>
void check_transposed_reduce(DType dtype, int64_t D) {
  SCOPED_TRACE("dtype " + std::to_string(int(dtype)) + ", D " + std::to_string(D));
  std::mt19937 rng(5);
  std::vector<int64_t> off = {0};
  std::uniform_int_distribution<int> kind(0, 40), word(0, 12);
  for (int i = 0; i < 700; ++i) {
    const int k = kind(rng);
    const int length = k == 0 ? 257 + word(rng) * 30 : k == 1 ? 15 + word(rng) % 4 : k == 2 ? 40 : word(rng);
    off.push_back(off.back() + length);
  }
  off.push_back(off.back() + 6000);  // shared over threads (shared_segment_rows)
  for (int i = 0; i < 5; ++i) off.push_back(off.back() + word(rng));  // a last group of 6 words
  const int64_t S = int64_t(off.size()) - 1, T_ = off.back();
  // Specials: one in 8 values of the words (two NaNs in a word test which one a max
  // keeps), one in 2000 of the long segments (so that most of these have none and
  // their sums show the blocks' order). Other values half small integers (ties),
  // half inexact.
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<T> x(static_cast<size_t>(T_ * D));
  for (int64_t s = 0; s < S; ++s) {
    const int every = off[s + 1] - off[s] > kReduceBlockRows ? 2000 : 8;
    for (int64_t t = off[s] * D; t < off[s + 1] * D; ++t) {
      const int c = int(rng() % uint32_t(4 * every));
      const float inf = std::numeric_limits<float>::infinity();
      const float value = c == 1 ? inf : c == 2 ? -inf : c == 3 ? -0.0f
                        : c % 2 ? float(small(rng)) : float(small(rng)) * 0.37f + 1e-4f * float(c % 97);
      x[size_t(t)] = c == 0 ? quiet_nan_with_payload<T>(rng()) : from_acc<T>(value);
    }
  }
  for (Reduce r : {Reduce::kSum, Reduce::kMean, Reduce::kMax, Reduce::kMin}) {
    SCOPED_TRACE("reduce " + std::to_string(int(r)));
    Runtime serial;
    // 16 more than S: a store past the last word shows there (the fill is a value no
    // result here takes, so an element left unwritten shows too)
    const T fill = from_acc<T>(-12345.0f);
    std::vector<T> expected(size_t((S + 16) * D), fill), transposed(size_t((S + 16) * D), fill);
    isa_base::segment_reduce_cpu(serial, dtype, x.data(), off.data(), S, T_, D, r, expected.data());
    for (int64_t piece : {int64_t(1), int64_t(3), int64_t(1000)}) {
      g_piece = piece;
      Runtime rt;
      rt.parallel_for = &pieces_last_first;
      rt.threads = 2;
      std::fill(transposed.begin(), transposed.end(), fill);
      isa_avx512::segment_reduce_cpu(rt, dtype, x.data(), off.data(), S, T_, D, r, transposed.data());
      // Sum and mean: bitwise up to NaN payloads, which the documented promise leaves
      // out (the compiler may swap an add's operands, and x86 keeps the first
      // operand's payload); max/min select, so their NaNs are compared too.
      if (r == Reduce::kSum || r == Reduce::kMean) {
        for (size_t i = 0; i < expected.size(); ++i)
          if (std::isnan(to_acc(expected[i])) && std::isnan(to_acc(transposed[i]))) transposed[i] = expected[i];
      }
      EXPECT_EQ(0, std::memcmp(transposed.data(), expected.data(), expected.size() * sizeof(T)))
          << "tasks of " << piece << " groups";
    }
    if (r == Reduce::kSum || r == Reduce::kMean) continue;
    // The max/min backward of narrow rows: 16 elements of a word loaded, compared and
    // stored at a time, the store spilling into later words' rows of the same task;
    // tasks run last first show a spill into another task's rows. grad_y has NaNs with
    // payloads and -0.0, which must arrive as they are; 16 more rows show a store
    // past the end.
    std::vector<T> grad_y(static_cast<size_t>(S * D));
    for (int64_t i = 0; i < S * D; ++i)
      grad_y[size_t(i)] = i % 11 == 0 ? quiet_nan_with_payload<T>(rng()) : i % 7 == 0 ? from_acc<T>(-0.0f)
                                                                                  : from_acc<T>(float(i % 13) - 6.5f);
    std::vector<T> expected_grad(size_t((T_ + 16) * D), fill), grad(size_t((T_ + 16) * D), fill);
    isa_base::segment_reduce_backward_cpu(serial, dtype, grad_y.data(), x.data(), expected.data(), off.data(), S, T_,
                                          D, r, expected_grad.data());
    for (int64_t piece : {int64_t(1), int64_t(3), int64_t(1000)}) {
      g_piece = piece;
      Runtime rt;
      rt.parallel_for = &pieces_last_first;
      rt.threads = 2;
      std::fill(grad.begin(), grad.end(), fill);
      isa_avx512::segment_reduce_backward_cpu(rt, dtype, grad_y.data(), x.data(), expected.data(), off.data(), S, T_,
                                              D, r, grad.data());
      EXPECT_EQ(0, std::memcmp(grad.data(), expected_grad.data(), grad.size() * sizeof(T)))
          << "backward, tasks of " << piece << " words";
    }
  }
}
}  // namespace

TEST(SegmentReduce, NarrowRowsTransposedGiveTheBaselineBits) {
  if (cpu_isa_supported() != CpuIsa::kAvx512) GTEST_SKIP() << "no AVX-512 on this CPU";
  for (int64_t D : {1, 2, 4, 8}) {
    check_transposed_reduce<float>(DType::kFloat32, D);
    check_transposed_reduce<bf16_t>(DType::kBFloat16, D);
    check_transposed_reduce<f16_t>(DType::kFloat16, D);
  }
}
#endif

TEST(SegmentReduce, VectorPathMatchesScalarRulesForEveryDtype) {
  // D = 45 runs 32 features through the 16-byte vector path and 13 through the
  // scalar one; both must equal float accumulation + the scalar conversions.
  const int64_t D = 45;
  const std::vector<int64_t> off = {0, 3, 3, 4, 9};
  const int64_t T = 9, S = 4;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  std::vector<float> xf(T * D);
  for (auto& v : xf) v = dist(rng);
  xf[0] = std::nanf("");                          // NaN stays NaN
  xf[1] = std::numeric_limits<float>::infinity();  // inf stays inf
  xf[2] = 1.00390625f;                             // bf16 tie: rounds to even
  std::vector<bf16_t> xb(T * D);
  std::vector<f16_t> xh(T * D);
  for (int64_t i = 0; i < T * D; ++i) {
    xb[i] = float_to_bf16(xf[i]);
    xh[i] = float_to_f16(xf[i]);
  }
  Runtime rt;
  for (Reduce r : {Reduce::kSum, Reduce::kMean}) {
    std::vector<bf16_t> yb(S * D);
    std::vector<f16_t> yh(S * D);
    segment_reduce_cpu(rt, DType::kBFloat16, xb.data(), off.data(), S, T, D, r, yb.data());
    segment_reduce_cpu(rt, DType::kFloat16, xh.data(), off.data(), S, T, D, r, yh.data());
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) {
        float accb = 0.0f, acch = 0.0f;
        for (int64_t t = off[s]; t < off[s + 1]; ++t) {
          accb += bf16_to_float(xb[t * D + d]);
          acch += f16_to_float(xh[t * D + d]);
        }
        const int64_t n = off[s + 1] - off[s];
        if (r == Reduce::kMean && n > 0) {
          accb /= float(n);
          acch /= float(n);
        }
        const uint16_t eb = float_to_bf16(accb).bits, eh = float_to_f16(acch).bits;
        ASSERT_EQ(yb[s * D + d].bits, eb) << "bf16 s=" << s << " d=" << d;
        ASSERT_EQ(yh[s * D + d].bits, eh) << "f16 s=" << s << " d=" << d;
      }
  }
}

// The CPU kernel's 64-byte mask walk (pooling_cpu_words.h) against the core's
// byte-by-byte walk, chunk by chunk, on random streams: every class of byte,
// multi-byte characters, long words, empty and one-byte sequences, and chunk
// sizes that split blocks, words and sequences anywhere.
TEST(WordBoundaries, MaskWalkMatchesTheCoreWalk) {
  std::mt19937 rng(3);
  const std::vector<uint8_t> alphabet = {' ', '\t', '\n', '\r', '\v', '\f', 'a', 'Z', '0', '_', '.',
                                         ',', '(', 0x00, 0x7f, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0x80, 0xFF};
  for (int trial = 0; trial < 300; ++trial) {
    // every third trial: runs far longer than the chunks, so that whole chunks hold no
    // word start (they own no word and stop at their end)
    const bool long_runs = trial % 3 == 0;
    const int64_t T = int64_t(rng() % (long_runs ? 3000 : 700));
    std::vector<uint8_t> bytes(static_cast<size_t>(T));
    const int run = 1 + int(rng() % (long_runs ? 1500 : 40));  // long runs of one byte make long words
    for (size_t i = 0; i < bytes.size(); ++i)
      bytes[i] = (i % run != 0 && (long_runs || rng() % 3 != 0)) ? bytes[i - 1] : alphabet[rng() % alphabet.size()];
    std::vector<int64_t> cu = {0};
    while (cu.back() < T) cu.push_back(std::min<int64_t>(T, cu.back() + int64_t(rng() % 300)));
    if (rng() % 4 == 0) cu.push_back(T);  // an empty last sequence
    const int64_t B = int64_t(cu.size()) - 1;
    const int64_t chunk_sizes[] = {1, 7, 63, 64, 65, 200, 4096};
    const int64_t chunk = chunk_sizes[rng() % 7];
    const int64_t max_bytes = int64_t(4 + rng() % 30);
    for (WordMode mode : {WordMode::kSpace, WordMode::kBytes}) {
      std::vector<int64_t> core, masks;
      for (int64_t c = 0; c < num_word_chunks(T, chunk); ++c) {
        for_each_word_start_in_chunk(bytes.data(), cu.data(), B, T, chunk, c, max_bytes, mode,
                                     [&](int64_t p) { core.push_back(p); });
        for_each_word_start_in_chunk_cpu(bytes.data(), cu.data(), B, T, chunk, c, max_bytes, mode,
                                         [&](int64_t p) { masks.push_back(p); });
      }
      ASSERT_EQ(masks, core) << "trial " << trial << " T=" << T << " chunk=" << chunk
                             << " max_bytes=" << max_bytes;
    }
  }
}
