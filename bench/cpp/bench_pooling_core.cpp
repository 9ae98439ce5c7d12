// Single-thread throughput of the pooling core's CPU kernels: bytes processed per
// second, to compare against the machine's single-core copy bandwidth.
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "pooling/pooling_kernels.h"

using namespace tokcore;
using namespace tokcore::pooling;

namespace {

std::vector<int64_t> word_offsets(int64_t T, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> off = {0};
  while (off.back() < T) off.push_back(std::min<int64_t>(T, off.back() + 1 + int64_t(rng() % 9)));
  return off;
}

template <typename V, DType kType>
void BM_SegmentReduceMean(benchmark::State& state) {
  const int64_t T = state.range(0), D = state.range(1);
  const auto off = word_offsets(T, 1);
  const int64_t S = int64_t(off.size()) - 1;
  std::vector<V> x(T * D, from_acc<V>(1.0f)), y(S * D);
  Runtime rt;
  for (auto _ : state) {
    segment_reduce_cpu(rt, kType, x.data(), off.data(), S, T, D, Reduce::kMean, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * (T + S) * D * int64_t(sizeof(V)));
}
BENCHMARK(BM_SegmentReduceMean<float, DType::kFloat32>)->Args({1 << 16, 256})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SegmentReduceMean<bf16_t, DType::kBFloat16>)->Args({1 << 16, 256})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SegmentReduceMean<f16_t, DType::kFloat16>)->Args({1 << 16, 256})->Unit(benchmark::kMillisecond);

void BM_SegmentExpand(benchmark::State& state) {
  const int64_t T = state.range(0), D = state.range(1);
  const auto off = word_offsets(T, 2);
  const int64_t S = int64_t(off.size()) - 1;
  std::vector<float> y(S * D, 1.0f), x(T * D);
  Runtime rt;
  for (auto _ : state) {
    segment_expand_cpu(rt, DType::kFloat32, y.data(), off.data(), S, T, D, x.data());
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(state.iterations() * (T + S) * D * int64_t(sizeof(float)));
}
BENCHMARK(BM_SegmentExpand)->Args({1 << 16, 256})->Unit(benchmark::kMillisecond);

void BM_WordBoundaries(benchmark::State& state) {
  const int64_t T = state.range(0);
  std::mt19937 rng(3);
  const char alphabet[] = "abcdefghij klmnop,.\n";
  std::vector<uint8_t> text(T);
  for (auto& b : text) b = uint8_t(alphabet[rng() % (sizeof(alphabet) - 1)]);
  const int64_t cu[2] = {0, T};
  Runtime rt;
  std::vector<int64_t> counts(num_word_chunks(T, kWordChunkBytesCpu));
  for (auto _ : state) {
    const int64_t W = word_boundaries_count_cpu(rt, text.data(), cu, 1, 16, WordMode::kSpace, counts.data());
    benchmark::DoNotOptimize(W);
  }
  state.SetBytesProcessed(state.iterations() * T);
}
BENCHMARK(BM_WordBoundaries)->Arg(1 << 22)->Unit(benchmark::kMillisecond);

}  // namespace
