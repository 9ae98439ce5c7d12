// segment_reduce mean forward, bf16, on the GPU: the production kernel next to
// variants that keep more loads in flight per thread, on the issue's workload
// (T = 2^21 rows, D = 512, segment lengths 1..9), against the device-copy ceiling.
//
// Why the variants: the production thread combines each row as it arrives, so its
// loads wait for one another outside the 4-way unrolled part, and words are short.
// Loading a group of rows first keeps more bytes in flight but costs registers
// (measured with nvcc -Xptxas -v for sm_90: 40 for production, about 64 for groups
// of 4), hence fewer resident threads. Which wins is a question for the GPU, so
// bench/gpu_check.sh runs this once per GPU session (make cuda-bench).
//
// Torch-free: links the production launcher (tokcore_core_cuda) and nothing else.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "pooling/pooling_kernels.h"
#include "tokcore/pooling/segment_threads.h"

namespace {

using namespace tokcore;
using namespace tokcore::pooling;

constexpr int kThreads = 256;
constexpr int kVec = 8;  // bf16 features per 16-byte load

#define CHECK_CUDA(call)                                                                 \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

// The variant's thread: rows are loaded kGroup at a time, then combined in order
// (so the bits equal the production kernel's).
template <int kGroup>
__device__ void grouped_mean_thread(int64_t i, const bf16_t* __restrict__ x,
                                    const int64_t* __restrict__ offsets, int64_t rows_total,
                                    int64_t D, bf16_t* __restrict__ y) {
  const SegmentThread th = segment_thread<kVec>(i, D);
  const RowRange rows = segment_rows(offsets, th.s, rows_total);
  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  const bf16_t* p = x + rows.begin * D + th.col;
  for (int64_t t = rows.begin; t < rows.end; t += kGroup, p += kGroup * D) {
    const int64_t in_group = rows.end - t;
    Vec<bf16_t, kVec> v[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k)
      if (k < in_group) v[k] = load_vec<bf16_t, kVec>(p + k * D);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k >= in_group) break;
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = reduce_combine<Reduce::kMean, float>(acc[j], to_acc(v[k].v[j]));
    }
  }
  Vec<bf16_t, kVec> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    out.v[j] = from_acc<bf16_t>(reduce_finalize<Reduce::kMean, float>(acc[j], rows.end - rows.begin));
  store_vec<bf16_t, kVec>(y + th.s * D + th.col, out);
}

template <int kGroup, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    grouped_mean_kernel(const bf16_t* x, const int64_t* offsets, int64_t S, int64_t rows_total, int64_t D,
                        bf16_t* y) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < S * (D / kVec)) grouped_mean_thread<kGroup>(i, x, offsets, rows_total, D, y);
}

// Deterministic pseudo-random bf16 values in [-1, 1), made on the device.
__global__ void fill_kernel(bf16_t* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ uint32_t(i >> 32);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i].bits = uint16_t((float_to_bits(float(h & 0xffffff) / 8388608.f - 1.f)) >> 16);
  }
}

struct Timing {
  float median_ms;
};

// Median of 20 timed launches after 3 warm-up launches, with CUDA events.
template <typename Launch>
Timing time_launches(Launch&& launch, cudaStream_t st) {
  for (int r = 0; r < 3; ++r) launch();
  CHECK_CUDA(cudaStreamSynchronize(st));
  std::vector<float> ms;
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int r = 0; r < 20; ++r) {
    CHECK_CUDA(cudaEventRecord(a, st));
    launch();
    CHECK_CUDA(cudaEventRecord(b, st));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return Timing{ms[ms.size() / 2]};
}

struct KernelInfo {
  int registers = 0, threads_per_sm = 0;
};

template <typename Kernel>
KernelInfo kernel_info(Kernel kernel) {
  cudaFuncAttributes attr{};
  CHECK_CUDA(cudaFuncGetAttributes(&attr, kernel));
  int blocks = 0;
  CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  return KernelInfo{attr.numRegs, blocks * kThreads};
}

}  // namespace

int main() {
  const int64_t T = int64_t(1) << 21, D = 512;
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));

  // Segments of 1..9 rows, as in bench/bench_pooling.py.
  std::mt19937_64 rng(0);
  std::uniform_int_distribution<int64_t> length(1, 9);
  std::vector<int64_t> offsets{0};
  while (offsets.back() < T) offsets.push_back(std::min(T, offsets.back() + length(rng)));
  const int64_t S = int64_t(offsets.size()) - 1;

  cudaStream_t st;
  CHECK_CUDA(cudaStreamCreate(&st));
  bf16_t *x = nullptr, *y_ref = nullptr, *y = nullptr;
  int64_t* d_offsets = nullptr;
  CHECK_CUDA(cudaMalloc(&x, sizeof(bf16_t) * T * D));
  CHECK_CUDA(cudaMalloc(&y_ref, sizeof(bf16_t) * S * D));
  CHECK_CUDA(cudaMalloc(&y, sizeof(bf16_t) * S * D));
  CHECK_CUDA(cudaMalloc(&d_offsets, sizeof(int64_t) * (S + 1)));
  CHECK_CUDA(cudaMemcpy(d_offsets, offsets.data(), sizeof(int64_t) * (S + 1), cudaMemcpyHostToDevice));
  fill_kernel<<<4096, kThreads, 0, st>>>(x, T * D);
  CHECK_CUDA(cudaGetLastError());

  // Ceiling: a 1 GiB device-to-device copy, bytes read + written.
  const size_t copy_bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  CHECK_CUDA(cudaMemsetAsync(src, 1, copy_bytes, st));
  const Timing copy = time_launches([&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, st)); }, st);
  const double ceiling = 2.0 * copy_bytes / (copy.median_ms * 1e-3);
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));

  const double bytes = double(T + S) * D * sizeof(bf16_t);  // as bench_pooling.py counts them
  const unsigned blocks = unsigned((S * (D / kVec) + kThreads - 1) / kThreads);
  std::vector<uint16_t> host_ref(S * D), host(S * D);

  std::printf("### segment_reduce mean fwd bf16 kernel variants on %s (T=%lld, D=%lld, S=%lld)\n\n", prop.name,
              (long long)T, (long long)D, (long long)S);
  std::printf("| kernel | registers | resident threads/SM | ms | GB/s | of copy | bits equal production |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  auto report = [&](const char* name, const char* registers, const char* threads, Timing t, bool equal) {
    std::printf("| %s | %s | %s | %.3f | %.0f | %.0f%% | %s |\n", name, registers, threads, t.median_ms,
                bytes / (t.median_ms * 1e-3) / 1e9, 100.0 * bytes / (t.median_ms * 1e-3) / ceiling,
                equal ? "yes" : "NO");
  };

  // (words need no workspace; it is for long segments, reduced in blocks)
  int64_t longest = 0;  // (as the adapter's offsets check measures it)
  for (int64_t s = 0; s < S; ++s) longest = std::max(longest, offsets[size_t(s + 1)] - offsets[size_t(s)]);
  const size_t ws_bytes = segment_reduce_workspace_cuda(tokcore::DType::kBFloat16, S, T, D, longest);
  void* workspace = nullptr;
  if (ws_bytes > 0) CHECK_CUDA(cudaMalloc(&workspace, ws_bytes));
  const Timing production = time_launches([&] {
    CHECK_CUDA(cudaError_t(segment_reduce_cuda(tokcore::DType::kBFloat16, x, d_offsets, S, T, D, Reduce::kMean,
                                               longest, workspace, ws_bytes, y_ref, st)));
  }, st);
  CHECK_CUDA(cudaMemcpy(host_ref.data(), y_ref, sizeof(bf16_t) * S * D, cudaMemcpyDeviceToHost));
  // (the production kernel is internal to pooling_cuda.cu: nvcc -Xptxas -v shows its
  // registers, 40 for sm_90 with nvcc 13.0)
  report("production (segment_reduce_cuda)", "see ptxas", "-", production, true);

  auto run_variant = [&](const char* name, auto kernel) {
    CHECK_CUDA(cudaMemsetAsync(y, 0xff, sizeof(bf16_t) * S * D, st));
    const Timing t = time_launches([&] {
      kernel<<<blocks, kThreads, 0, st>>>(x, d_offsets, S, T, D, y);
      CHECK_CUDA(cudaGetLastError());
    }, st);
    CHECK_CUDA(cudaMemcpy(host.data(), y, sizeof(bf16_t) * S * D, cudaMemcpyDeviceToHost));
    const KernelInfo info = kernel_info(kernel);
    const std::string registers = std::to_string(info.registers), threads = std::to_string(info.threads_per_sm);
    report(name, registers.c_str(), threads.c_str(), t,
           std::memcmp(host.data(), host_ref.data(), host.size() * sizeof(uint16_t)) == 0);
  };
  run_variant("rows loaded 2 at a time", grouped_mean_kernel<2, 1>);
  run_variant("rows loaded 4 at a time", grouped_mean_kernel<4, 1>);
  run_variant("rows loaded 4 at a time, <= 48 registers", grouped_mean_kernel<4, 5>);
  run_variant("rows loaded 8 at a time", grouped_mean_kernel<8, 1>);

  std::printf("\n- copy ceiling: %.0f GB/s (1 GiB device-to-device copy, read + write)\n", ceiling / 1e9);
  std::printf("- bytes counted: T*D read + S*D written (bf16); median of 20 launches\n");
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(y_ref));
  CHECK_CUDA(cudaFree(y));
  CHECK_CUDA(cudaFree(d_offsets));
  CHECK_CUDA(cudaFree(workspace));
  CHECK_CUDA(cudaStreamDestroy(st));
  return 0;
}
