// The CUDA kernels' per-thread bodies (tokcore/pooling/segment_threads.h) and
// chunked word_boundaries pipeline, run on the host thread by thread with the
// GPU's launch parameters, against the CPU kernels. Same bits expected: both
// sum each element's rows in order, in the same accumulator type.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "pooling/pooling_kernels.h"
#include "tokcore/pooling/segment_threads.h"

using namespace tokcore;
using namespace tokcore::pooling;

namespace {

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<double>() { return DType::kFloat64; }
template <> constexpr DType dtype_of<bf16_t>() { return DType::kBFloat16; }
template <> constexpr DType dtype_of<f16_t>() { return DType::kFloat16; }

// 16-byte aligned storage, as torch's allocators give (the vector path needs it).
template <typename T>
struct Buffer {
  std::vector<Vec<uint8_t, 16>> raw;
  int64_t n;
  explicit Buffer(int64_t count) : raw(size_t((count * int64_t(sizeof(T)) + 15) / 16 + 1)), n(count) {}
  T* data() { return reinterpret_cast<T*>(raw.data()); }
  const T* data() const { return reinterpret_cast<const T*>(raw.data()); }
  // Sets every byte, so that a comparison sees elements that no thread wrote.
  void fill_bytes(uint8_t byte) {
    for (auto& v : raw) std::memset(v.v, byte, sizeof(v.v));
  }
  std::vector<uint8_t> bytes() const {
    const auto* p = reinterpret_cast<const uint8_t*>(raw.data());
    return std::vector<uint8_t>(p, p + n * int64_t(sizeof(T)));
  }
};

template <typename T>
Buffer<T> random_rows(int64_t rows, int64_t D, std::mt19937& rng, bool specials) {
  Buffer<T> x(rows * D);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (int64_t i = 0; i < rows * D; ++i) x.data()[i] = from_acc<T>(acc_t<T>(normal(rng)));
  if (specials && rows * D >= 3) {
    x.data()[0] = from_acc<T>(std::numeric_limits<acc_t<T>>::quiet_NaN());
    x.data()[rows * D / 2] = from_acc<T>(std::numeric_limits<acc_t<T>>::infinity());
    x.data()[rows * D - 1] = from_acc<T>(-std::numeric_limits<acc_t<T>>::infinity());
  }
  return x;
}

// Offsets over T rows with segment lengths 0..max_len (empty segments included).
std::vector<int64_t> random_offsets(int64_t T, int64_t max_len, std::mt19937& rng) {
  if (max_len < 1) throw std::invalid_argument("random_offsets: max_len must be >= 1");
  std::vector<int64_t> off = {0};
  while (off.back() < T) off.push_back(std::min<int64_t>(T, off.back() + int64_t(rng() % (max_len + 1))));
  return off;
}

// Runs body(i) for every thread of a launch of S * D / N threads, as the CUDA
// launcher does (launch_segments in pooling_cuda.cu).
template <int N, typename Body>
void run_threads(int64_t S, int64_t D, Body&& body) {
  for (int64_t i = 0; i < S * (D / N); ++i) body(i);
}

// The same for the row-writing kernels split into `parts` row parts: body(i, part)
// for every thread g of a launch of S * D / N * parts threads, mapped as the
// kernels map it (part_thread), last thread first. (Every part writes the same
// values, so a row written twice goes unseen here: RowPartsWriteDisjointRows checks that.)
template <int N, typename Body>
void run_part_threads(int64_t S, int64_t D, int64_t parts, Body&& body) {
  const int64_t per_part = S * (D / N);
  for (int64_t g = per_part * parts - 1; g >= 0; --g) {
    const PartThread th = part_thread(g, per_part, parts);
    body(th.i, th.part);
  }
}

// The GPU's max/min backward in two passes over `parts` row parts (launch order
// reversed by run_part_threads; atomicMin as std::min).
template <typename T, int N>
void max_min_backward_in_parts_on_host(int64_t parts, const T* grad_y, const T* x, const T* y,
                                       const std::vector<int64_t>& off, int64_t T_, int64_t D, T* grad_x) {
  const int64_t S = int64_t(off.size()) - 1;
  std::vector<int64_t> first_row(size_t(S * D), kNoRow);
  run_part_threads<N>(S, D, parts, [&](int64_t i, int64_t part) {
    max_min_first_rows_thread<T, N>(i, part, parts, x, y, off.data(), T_, D, [&](int64_t index, int64_t row) {
      first_row[size_t(index)] = std::min(first_row[size_t(index)], row);
    });
  });
  run_part_threads<N>(S, D, parts, [&](int64_t i, int64_t part) {
    max_min_write_rows_thread<T, N>(i, part, parts, grad_y, first_row.data(), off.data(), T_, D, grad_x);
  });
}

// Row parts tried for the row-writing kernels: none, and splits that divide the
// segments' lengths evenly or not, or exceed them.
const int64_t kParts[] = {1, 2, 3, 7};

struct Case {
  int64_t T, D, max_len;
};
// The last two have segments longer than kReduceBlockRows, which the reduce takes in blocks.
const Case kCases[] = {{0, 8, 3}, {1, 8, 1}, {40, 8, 4}, {97, 16, 9}, {64, 24, 1}, {200, 64, 12},
                       {1500, 16, 700}, {700, 8, 600}};

// The reduce forward as segment_reduce_cuda runs it for blocks_from_rows
// (reduce_blocks_from_rows), thread by thread: the segment threads (unless every
// segment is taken in blocks), then, unless none is, the three passes of the blocks:
// block counts and their exclusive scan, pass 2 over blocks_bound * D / N threads,
// pass 3 over S * D / N threads.
template <typename T, int N, Reduce R>
void reduce_forward_on_host(const T* x, const std::vector<int64_t>& off, int64_t rows_total, int64_t D,
                            int64_t blocks_from_rows, T* y) {
  const int64_t S = int64_t(off.size()) - 1;
  if (blocks_from_rows != 0)
    run_threads<N>(S, D, [&](int64_t i) {
      segment_reduce_thread<T, N, R>(i, x, off.data(), rows_total, D, blocks_from_rows, y);
    });
  if (blocks_from_rows == kNoBlocks) return;
  std::vector<int64_t> block_begin(size_t(S + 1), 0);
  for (int64_t s = 0; s < S; ++s)
    block_begin[size_t(s + 1)] =
        block_begin[size_t(s)] + segment_blocks_in_pass(off.data(), s, rows_total, blocks_from_rows);
  const int64_t bound = reduce_blocks_bound(S, rows_total, blocks_from_rows);
  std::vector<acc_t<T>> partials(size_t(bound * D));  // exactly the bound: ASan sees any overrun
  for (int64_t g = bound * (D / N) - 1; g >= 0; --g)
    segment_reduce_block_thread<T, N, R>(g, x, off.data(), block_begin.data(), S, rows_total, D,
                                         partials.data());
  run_threads<N>(S, D, [&](int64_t i) {
    segment_reduce_combine_thread<T, N, R>(i, partials.data(), off.data(), block_begin.data(), bound,
                                           rows_total, D, blocks_from_rows, y);
  });
}

// The ways segment_reduce_cuda splits the segments: none in blocks, those longer
// than a block (among many short ones), and all.
const int64_t kBlocksFromRows[] = {kNoBlocks, kReduceBlockRows + 1, 0};

template <typename T, int N, Reduce R>
void check_reduce_and_backward(const Case& c, std::mt19937& rng) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " D=" + std::to_string(c.D) + " N=" + std::to_string(N) +
               " reduce=" + std::to_string(int(R)));
  const Runtime rt;
  const auto off = random_offsets(c.T, c.max_len, rng);
  const int64_t S = int64_t(off.size()) - 1;
  const auto x = random_rows<T>(c.T, c.D, rng, true);
  Buffer<T> y_cpu(S * c.D);
  segment_reduce_cpu(rt, dtype_of<T>(), x.data(), off.data(), S, c.T, c.D, R, y_cpu.data());
  for (int64_t blocks_from_rows : kBlocksFromRows) {
    SCOPED_TRACE("blocks_from_rows=" + std::to_string(blocks_from_rows));
    Buffer<T> y_gpu(S * c.D);
    y_gpu.fill_bytes(0xA5);
    reduce_forward_on_host<T, N, R>(x.data(), off, c.T, c.D, blocks_from_rows, y_gpu.data());
    EXPECT_EQ(y_gpu.bytes(), y_cpu.bytes());
  }

  const auto grad_y = random_rows<T>(S, c.D, rng, false);
  Buffer<T> gx_cpu(c.T * c.D);
  segment_reduce_backward_cpu(rt, dtype_of<T>(), grad_y.data(), x.data(), y_cpu.data(), off.data(), S,
                              c.T, c.D, R, gx_cpu.data());
  const bool in_order = R == Reduce::kMax || R == Reduce::kMin;  // split only in two passes
  for (int64_t parts : kParts) {
    SCOPED_TRACE("parts=" + std::to_string(parts));
    Buffer<T> gx_gpu(c.T * c.D);
    if (in_order && parts > 1) {  // the launcher's two passes
      max_min_backward_in_parts_on_host<T, N>(parts, grad_y.data(), x.data(), y_cpu.data(), off, c.T, c.D,
                                              gx_gpu.data());
    } else {
      run_part_threads<N>(S, c.D, parts, [&](int64_t i, int64_t part) {
        segment_reduce_backward_thread<T, N, R>(i, part, parts, grad_y.data(), x.data(), y_cpu.data(),
                                                off.data(), c.T, c.D, gx_gpu.data());
      });
    }
    EXPECT_EQ(gx_gpu.bytes(), gx_cpu.bytes());
  }
}

template <typename T, int N>
void check_expand_pack_unpack(const Case& c, std::mt19937& rng) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " D=" + std::to_string(c.D) + " N=" + std::to_string(N));
  const Runtime rt;
  const auto off = random_offsets(c.T, c.max_len, rng);
  const int64_t S = int64_t(off.size()) - 1;
  const auto y = random_rows<T>(S, c.D, rng, true);
  const auto x = random_rows<T>(c.T, c.D, rng, true);
  Buffer<T> x_cpu(c.T * c.D);
  segment_expand_cpu(rt, dtype_of<T>(), y.data(), off.data(), S, c.T, c.D, x_cpu.data());
  for (int64_t parts : kParts) {
    SCOPED_TRACE("parts=" + std::to_string(parts));
    Buffer<T> x_gpu(c.T * c.D);
    run_part_threads<N>(S, c.D, parts, [&](int64_t i, int64_t part) {
      segment_expand_thread<T, N>(i, part, parts, y.data(), off.data(), c.T, c.D, x_gpu.data());
    });
    EXPECT_EQ(x_gpu.bytes(), x_cpu.bytes());

    for (int64_t max_len : {int64_t(0), int64_t(1), c.max_len / 2, c.max_len + 2}) {
      SCOPED_TRACE("max_len=" + std::to_string(max_len));
      Buffer<T> p_gpu(S * max_len * c.D), p_cpu(S * max_len * c.D);
      run_part_threads<N>(S, c.D, parts, [&](int64_t i, int64_t part) {
        segment_pack_thread<T, N>(i, part, parts, x.data(), off.data(), c.T, c.D, max_len, p_gpu.data());
      });
      segment_pack_cpu(rt, dtype_of<T>(), x.data(), off.data(), S, c.T, c.D, max_len, p_cpu.data());
      EXPECT_EQ(p_gpu.bytes(), p_cpu.bytes());

      Buffer<T> u_gpu(c.T * c.D), u_cpu(c.T * c.D);
      run_part_threads<N>(S, c.D, parts, [&](int64_t i, int64_t part) {
        segment_unpack_thread<T, N>(i, part, parts, p_cpu.data(), off.data(), c.T, c.D, max_len,
                                    u_gpu.data());
      });
      segment_unpack_cpu(rt, dtype_of<T>(), p_cpu.data(), off.data(), S, c.T, c.D, max_len, u_cpu.data());
      EXPECT_EQ(u_gpu.bytes(), u_cpu.bytes());
    }
  }
}

// Both widths the launcher picks for T: one element, or a 16-byte vector.
template <typename T>
void check_all() {
  constexpr int kVec = 16 / sizeof(T);
  std::mt19937 rng(7);
  for (const Case& c : kCases) {
    if (c.D % kVec != 0) continue;
    check_reduce_and_backward<T, 1, Reduce::kSum>(c, rng);
    check_reduce_and_backward<T, 1, Reduce::kMean>(c, rng);
    check_reduce_and_backward<T, 1, Reduce::kMax>(c, rng);
    check_reduce_and_backward<T, 1, Reduce::kMin>(c, rng);
    check_reduce_and_backward<T, kVec, Reduce::kSum>(c, rng);
    check_reduce_and_backward<T, kVec, Reduce::kMean>(c, rng);
    check_reduce_and_backward<T, kVec, Reduce::kMax>(c, rng);
    check_reduce_and_backward<T, kVec, Reduce::kMin>(c, rng);
    check_expand_pack_unpack<T, 1>(c, rng);
    check_expand_pack_unpack<T, kVec>(c, rng);
  }
}

}  // namespace

TEST(CudaThreadsOnHost, Float32) { check_all<float>(); }
TEST(CudaThreadsOnHost, Float64) { check_all<double>(); }
TEST(CudaThreadsOnHost, BFloat16) { check_all<bf16_t>(); }
TEST(CudaThreadsOnHost, Float16) { check_all<f16_t>(); }

TEST(CudaThreadsOnHost, VectorWidthNeedsAlignedRowsAndBuffers) {
  alignas(16) float buf[8] = {};
  EXPECT_EQ(segment_vector_width<float>(8, {buf, buf + 4}), 4);
  EXPECT_EQ(segment_vector_width<float>(6, {buf}), 1);          // rows would start misaligned
  EXPECT_EQ(segment_vector_width<float>(8, {buf, buf + 1}), 1);  // a misaligned buffer
  EXPECT_EQ(segment_vector_width<float>(8, {buf, nullptr}), 4);  // unused buffers don't count
  EXPECT_EQ(segment_vector_width<bf16_t>(16, {buf}), 8);
  EXPECT_EQ(segment_vector_width<double>(2, {buf}), 2);
}

// Offsets out of range (which reach the kernels when the CUDA offsets check is off
// or skipped under graph capture) are clamped: every thread stays inside x and y.
TEST(CudaThreadsOnHost, BadOffsetsStayInBounds) {
  const int64_t T = 6, D = 4;
  const std::vector<int64_t> off = {-5, 2, 1, 100, std::numeric_limits<int64_t>::min()};
  const int64_t S = int64_t(off.size()) - 1;
  Buffer<float> x(T * D), y(S * D), back(T * D);
  for (int64_t i = 0; i < T * D; ++i) x.data()[i] = 1.0f;
  run_threads<4>(S, D, [&](int64_t i) {
    segment_reduce_thread<float, 4, Reduce::kSum>(i, x.data(), off.data(), T, D, kNoBlocks, y.data());
    segment_expand_thread<float, 4>(i, 0, 1, y.data(), off.data(), T, D, back.data());
  });
  // each end clamped into [0, T], the end to at least the begin: [0, 2), [2, 2), [1, 6), [6, 6)
  const float expected[] = {2, 0, 5, 0};
  for (int64_t s = 0; s < S; ++s)
    for (int64_t d = 0; d < D; ++d) EXPECT_EQ(y.data()[s * D + d], expected[s]) << s;
}

// In blocks too: offsets that claim more blocks than reduce_blocks_bound
// (overlapping clamped ranges) stay inside the partials (sized to that bound).
TEST(CudaThreadsOnHost, BadOffsetsInBlocksStayInBounds) {
  const int64_t T = 600, D = 4;
  const std::vector<int64_t> off = {0, T, 0, T, -7, T};  // three whole-T ranges after clamping
  const int64_t S = int64_t(off.size()) - 1;
  Buffer<float> x(T * D);
  for (int64_t i = 0; i < T * D; ++i) x.data()[i] = 1.0f;
  for (int64_t blocks_from_rows : {int64_t(0), kReduceBlockRows + 1}) {
    Buffer<float> y(S * D);
    reduce_forward_on_host<float, 4, Reduce::kSum>(x.data(), off, T, D, blocks_from_rows, y.data());
    EXPECT_EQ(y.data()[0], float(T)) << blocks_from_rows;  // its blocks are all within the bound
  }
}

// Long segments: a sum in blocks of kReduceBlockRows rows (the block sums added in
// order) differs from a plain running sum, and CPU and GPU both form the former.
TEST(CudaThreadsOnHost, LongSegmentsAreSummedInBlocks) {
  const int64_t T = 3 * kReduceBlockRows + 5, D = 4;
  const std::vector<int64_t> off = {0, T};
  std::mt19937 rng(3);
  const auto x = random_rows<float>(T, D, rng, false);
  Buffer<float> y(D);
  segment_reduce_cpu(Runtime{}, DType::kFloat32, x.data(), off.data(), 1, T, D, Reduce::kSum, y.data());
  bool differs_from_running_sum = false;
  for (int64_t d = 0; d < D; ++d) {
    float total = 0.0f, running = 0.0f;
    for (int64_t b = 0; b < T; b += kReduceBlockRows) {
      float block = 0.0f;
      for (int64_t t = b; t < std::min(T, b + kReduceBlockRows); ++t) block += x.data()[t * D + d];
      total += block;
    }
    for (int64_t t = 0; t < T; ++t) running += x.data()[t * D + d];
    EXPECT_EQ(y.data()[d], total) << d;
    differs_from_running_sum = differs_from_running_sum || running != total;
  }
  EXPECT_TRUE(differs_from_running_sum);  // else this test could not tell the orders apart
}

// Segments too long for one thread (a few sequences, or a long segment among many
// words): the CPU sets them aside and shares out their blocks over all its threads
// (reduce_shared_blocks). Same bits as one thread, and as the GPU's thread bodies
// whichever segments it takes in blocks. (A serial parallel_for that claims 8
// threads takes the path.)
template <typename T, Reduce R>
void check_long_segments_on_cpu(std::mt19937& rng) {
  constexpr int kVec = 16 / sizeof(T);
  std::vector<int64_t> mixed = random_offsets(4000, 9, rng);  // words, then one long segment, then words
  mixed.push_back(mixed.back() + 3000);
  const int64_t words_after = mixed.back();
  for (int64_t o : random_offsets(4000, 9, rng)) if (o > 0) mixed.push_back(words_after + o);
  for (const int64_t length : {3, 9, 1, 0, 7}) mixed.push_back(mixed.back() + length);
  for (int64_t D : {int64_t(kVec) * 5, int64_t(kVec) * 64 + 3, int64_t(3)}) {
    for (const std::vector<int64_t>& off : {std::vector<int64_t>{0, 3000}, {0, 700, 700, 2000, 2001, 2600}, mixed}) {
      SCOPED_TRACE("D=" + std::to_string(D) + " S=" + std::to_string(off.size() - 1));
      const int64_t S = int64_t(off.size()) - 1, rows = off.back();
      const auto x = random_rows<T>(rows, D, rng, R == Reduce::kMax || R == Reduce::kMin);
      Runtime one_thread, eight_threads;
      eight_threads.threads = 8;
      Buffer<T> y1(S * D), y8(S * D);
      segment_reduce_cpu(one_thread, dtype_of<T>(), x.data(), off.data(), S, rows, D, R, y1.data());
      segment_reduce_cpu(eight_threads, dtype_of<T>(), x.data(), off.data(), S, rows, D, R, y8.data());
      EXPECT_EQ(y8.bytes(), y1.bytes());
      for (int64_t blocks_from_rows : kBlocksFromRows) {
        Buffer<T> y_gpu(S * D);
        y_gpu.fill_bytes(0xA5);
        reduce_forward_on_host<T, 1, R>(x.data(), off, rows, D, blocks_from_rows, y_gpu.data());
        EXPECT_EQ(y8.bytes(), y_gpu.bytes()) << "blocks_from_rows=" << blocks_from_rows;
      }
    }
  }
}

TEST(CudaThreadsOnHost, LongSegmentsShareTheirBlocksOverCpuThreads) {
  std::mt19937 rng(9);
  check_long_segments_on_cpu<float, Reduce::kSum>(rng);
  check_long_segments_on_cpu<float, Reduce::kMean>(rng);
  check_long_segments_on_cpu<double, Reduce::kMean>(rng);
  check_long_segments_on_cpu<bf16_t, Reduce::kMean>(rng);
  check_long_segments_on_cpu<f16_t, Reduce::kSum>(rng);
  check_long_segments_on_cpu<float, Reduce::kMax>(rng);
  check_long_segments_on_cpu<bf16_t, Reduce::kMin>(rng);
  check_long_segments_on_cpu<f16_t, Reduce::kMax>(rng);
  check_long_segments_on_cpu<double, Reduce::kMin>(rng);
}

// The max/min backward of segments too long for one thread: pieces shared over
// threads find each feature's first attaining row (SegmentPieces). Values from a
// small set tie across pieces, so the first piece's row must win; a NaN sits in
// the middle of the long segment. Same bits as one thread and the GPU's threads.
template <typename T, Reduce R>
void check_long_max_min_backward_on_cpu(std::mt19937& rng) {
  constexpr int kVec = 16 / sizeof(T);
  std::vector<int64_t> mixed = random_offsets(2000, 9, rng);
  mixed.push_back(mixed.back() + 5000);
  for (const int64_t length : {3, 9, 1, 0, 7}) mixed.push_back(mixed.back() + length);
  for (int64_t D : {int64_t(kVec) * 5, int64_t(kVec) * 64 + 3, int64_t(3)}) {
    for (const std::vector<int64_t>& off : {std::vector<int64_t>{0, 3000}, mixed}) {
      SCOPED_TRACE("D=" + std::to_string(D) + " S=" + std::to_string(off.size() - 1));
      const int64_t S = int64_t(off.size()) - 1, rows = off.back();
      Buffer<T> x(rows * D), grad_y = random_rows<T>(S, D, rng, false);
      for (int64_t i = 0; i < rows * D; ++i) x.data()[i] = from_acc<T>(acc_t<T>(int(rng() % 4) - 1));
      x.data()[(rows - 1500) * D + D / 2] = from_acc<T>(std::numeric_limits<acc_t<T>>::quiet_NaN());
      Runtime one_thread, eight_threads;
      eight_threads.threads = 8;
      Buffer<T> y(S * D), g1(rows * D), g8(rows * D), g_gpu(rows * D);
      segment_reduce_cpu(one_thread, dtype_of<T>(), x.data(), off.data(), S, rows, D, R, y.data());
      segment_reduce_backward_cpu(one_thread, dtype_of<T>(), grad_y.data(), x.data(), y.data(), off.data(), S,
                                  rows, D, R, g1.data());
      segment_reduce_backward_cpu(eight_threads, dtype_of<T>(), grad_y.data(), x.data(), y.data(), off.data(), S,
                                  rows, D, R, g8.data());
      run_threads<1>(S, D, [&](int64_t i) {
        segment_reduce_backward_thread<T, 1, R>(i, 0, 1, grad_y.data(), x.data(), y.data(), off.data(), rows, D,
                                                g_gpu.data());
      });
      EXPECT_EQ(g8.bytes(), g1.bytes());
      EXPECT_EQ(g8.bytes(), g_gpu.bytes());
      for (int64_t parts : {2, 5}) {  // the GPU's two passes, ties across parts
        Buffer<T> g_parts(rows * D);
        max_min_backward_in_parts_on_host<T, 1>(parts, grad_y.data(), x.data(), y.data(), off, rows, D,
                                                g_parts.data());
        EXPECT_EQ(g_parts.bytes(), g1.bytes()) << "parts=" << parts;
      }
    }
  }
}

TEST(CudaThreadsOnHost, LongSegmentsMaxMinBackwardShareTheirPiecesOverCpuThreads) {
  std::mt19937 rng(10);
  check_long_max_min_backward_on_cpu<float, Reduce::kMax>(rng);
  check_long_max_min_backward_on_cpu<bf16_t, Reduce::kMin>(rng);
  check_long_max_min_backward_on_cpu<f16_t, Reduce::kMax>(rng);
  check_long_max_min_backward_on_cpu<double, Reduce::kMin>(rng);
}

TEST(CudaThreadsOnHost, ReduceInBlocksOnlyForFewLongSegments) {
  EXPECT_FALSE(reduce_in_blocks(0, 0, 0));
  EXPECT_TRUE(reduce_in_blocks(8 * 64, 8, int64_t(1) << 21));         // 8 sequences of 2^18 rows
  EXPECT_FALSE(reduce_in_blocks(int64_t(1) << 20, 1 << 14, int64_t(1) << 24));  // threads enough
  EXPECT_FALSE(reduce_in_blocks(400000 * 64 / 64, 400000, int64_t(1) << 21));  // words
  EXPECT_FALSE(reduce_in_blocks(64, 1, 2 * kReduceBlockRows - 1));  // one block and a bit
  EXPECT_EQ(reduce_blocks_bound(8, 1000, 0), 1000 / kReduceBlockRows + 8);
}

// A segment longer than a block among many short ones goes to the blocks alone,
// once the offsets check has measured it; the segment threads keep the rest.
TEST(CudaThreadsOnHost, LongSegmentsAmongShortOnesAreTakenInBlocks) {
  const int64_t words = 400000, T = int64_t(1) << 21, word_threads = words * 64;
  EXPECT_EQ(reduce_blocks_from_rows(word_threads, words, T, 9), kNoBlocks);
  EXPECT_EQ(reduce_blocks_from_rows(word_threads, words, T, kReduceBlockRows), kNoBlocks);  // one block
  EXPECT_EQ(reduce_blocks_from_rows(word_threads, words, T, kReduceBlockRows + 1), kReduceBlockRows + 1);
  EXPECT_EQ(reduce_blocks_from_rows(word_threads, words, T, -1), kNoBlocks);  // not measured
  EXPECT_EQ(reduce_blocks_from_rows(8 * 64, 8, T, T / 8), 0);                // a few long ones: all
  EXPECT_EQ(reduce_blocks_from_rows(8 * 64, 8, T, -1), 0);                   // (known from the mean)
  // blocks of segments of 257+ rows: at most T / 257 such segments, each one block
  // more than its rows / kReduceBlockRows
  EXPECT_EQ(reduce_blocks_bound(words, T, kReduceBlockRows + 1), T / kReduceBlockRows + T / (kReduceBlockRows + 1));
  EXPECT_EQ(reduce_blocks_bound(3, T, kReduceBlockRows + 1), T / kReduceBlockRows + 3);
  // the bound holds for the worst case: as many segments of 257 rows as fit
  const int64_t rows = 10 * (kReduceBlockRows + 1) + 3;
  std::vector<int64_t> off = {0};
  for (int s = 0; s < 10; ++s) off.push_back(off.back() + kReduceBlockRows + 1);
  off.push_back(rows);
  int64_t blocks = 0;
  for (int64_t s = 0; s + 1 < int64_t(off.size()); ++s)
    blocks += segment_blocks_in_pass(off.data(), s, rows, kReduceBlockRows + 1);
  EXPECT_EQ(blocks, 20);  // the short last segment has none
  EXPECT_LE(blocks, reduce_blocks_bound(int64_t(off.size()) - 1, rows, kReduceBlockRows + 1));
}

// The row parts of a split launch write disjoint rows that cover every row once
// (the comparisons above would not see a row written twice with the same value).
TEST(CudaThreadsOnHost, RowPartsWriteDisjointRows) {
  const int64_t D = 4, parts = 3;
  const std::vector<int64_t> off = {0, 7, 7, 8, 20};
  const int64_t S = int64_t(off.size()) - 1, T = off.back();
  Buffer<float> y(S * D);
  for (int64_t i = 0; i < S * D; ++i) y.data()[i] = 1.0f + float(i);  // no zeros
  std::vector<int> writes(size_t(T), 0);
  for (int64_t part = 0; part < parts; ++part) {
    Buffer<float> x(T * D);  // zeros: a row left zero was not written by this part
    run_part_threads<4>(S, D, parts, [&](int64_t i, int64_t p) {
      if (p == part) segment_expand_thread<float, 4>(i, p, parts, y.data(), off.data(), T, D, x.data());
    });
    for (int64_t t = 0; t < T; ++t) writes[size_t(t)] += x.data()[t * D] != 0.0f;
  }
  for (int64_t t = 0; t < T; ++t) EXPECT_EQ(writes[size_t(t)], 1) << "row " << t;
}

TEST(CudaThreadsOnHost, RowPartsOnlyWhenSegmentsAreLongAndFew) {
  EXPECT_EQ(row_parts(0, 100), 1);
  EXPECT_EQ(row_parts(int64_t(1) << 24, 5), 1);  // word pooling at scale: threads enough
  EXPECT_EQ(row_parts(1000, 1), 1);              // one-row segments: nothing to split
  EXPECT_EQ(row_parts(1000, 0), 1);              // no split asked for
  EXPECT_EQ(row_parts(256, 1 << 20), 4096);      // one long segment: about 2^20 threads
  EXPECT_EQ(row_parts(256, 100), 100);           // no more parts than rows
  EXPECT_EQ(row_parts(3000, 7), 7);
}

// word_boundaries as the CUDA path computes it: per-chunk counts over
// kWordChunkBytesCuda-byte chunks, an exclusive scan, per-chunk fills, then
// word_cu by binary search; against the CPU kernels (64 KiB chunks).
TEST(CudaThreadsOnHost, WordBoundariesChunkPipeline) {
  std::mt19937 rng(11);
  const char* pieces[] = {"def ", "f(x):", "\n    ", "return", " x", "+1", " caf\xC3\xA9", "\t",
                          "\xE2\x82\xAC\xE2\x82\xAC\xE2\x82\xAC\xE2\x82\xAC", "abcdefghijklmnopqrstuvwxyz",
                          "\x80\x80\x80\x80\x80\x80\x80", ",,", "  "};
  std::string text;
  while (text.size() < 5000) text += pieces[rng() % (sizeof(pieces) / sizeof(pieces[0]))];
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  const int64_t total = int64_t(text.size());
  const std::vector<int64_t> cu = {0, 0, 1, 700, 701, 2500, total};
  const int64_t B = int64_t(cu.size()) - 1;
  const Runtime rt;
  for (WordMode mode : {WordMode::kSpace, WordMode::kBytes}) {
    for (int64_t max_bytes : {4, 7, 64}) {
      SCOPED_TRACE("mode=" + std::to_string(int(mode)) + " max_bytes=" + std::to_string(max_bytes));
      // GPU pipeline, emulated
      const int64_t chunks = num_word_chunks(total, kWordChunkBytesCuda);
      std::vector<int64_t> counts(size_t(chunks + 1), 0), starts(size_t(chunks + 1), 0);
      for (int64_t c = 0; c < chunks; ++c)
        for_each_word_start_in_chunk(bytes, cu.data(), B, total, kWordChunkBytesCuda, c, max_bytes, mode,
                                     [&](int64_t) { ++counts[size_t(c)]; });
      for (int64_t c = 0; c < chunks; ++c) starts[size_t(c + 1)] = starts[size_t(c)] + counts[size_t(c)];
      const int64_t W = starts[size_t(chunks)];
      std::vector<int64_t> wo_gpu(size_t(W + 1)), wc_gpu(size_t(B + 1));
      for (int64_t c = 0; c < chunks; ++c) {
        int64_t* out = wo_gpu.data() + starts[size_t(c)];
        for_each_word_start_in_chunk(bytes, cu.data(), B, total, kWordChunkBytesCuda, c, max_bytes, mode,
                                     [&](int64_t p) { *out++ = p; });
      }
      wo_gpu[size_t(W)] = total;
      for (int64_t b = 0; b <= B; ++b) wc_gpu[size_t(b)] = lower_bound(wo_gpu.data(), W, cu[size_t(b)]);
      // CPU kernels
      std::vector<int64_t> chunk_counts(size_t(num_word_chunks(total, kWordChunkBytesCpu)));
      const int64_t W_cpu = word_boundaries_count_cpu(rt, bytes, cu.data(), B, max_bytes, mode, chunk_counts.data());
      ASSERT_EQ(W, W_cpu);
      std::vector<int64_t> wo_cpu(size_t(W + 1)), wc_cpu(size_t(B + 1));
      word_boundaries_fill_cpu(rt, bytes, cu.data(), B, max_bytes, mode, chunk_counts.data(), W,
                               wo_cpu.data(), wc_cpu.data());
      EXPECT_EQ(wo_gpu, wo_cpu);
      EXPECT_EQ(wc_gpu, wc_cpu);
    }
  }
}
