// A torch-free parallel_for: the core's CPU kernels take a Runtime whose
// function pointer the torch adapter fills with torch's own thread pool
// (torch::stable::parallel_for), and the C++ unit tests with a serial loop.
#pragma once

#include <cstdint>

namespace tokcore {

struct Runtime {
  // Calls body(ctx, begin, end) on disjoint subranges covering [begin, end).
  using ParallelForFn = void (*)(int64_t begin, int64_t end, int64_t grain, void* ctx,
                                 void (*body)(void* ctx, int64_t begin, int64_t end));
  ParallelForFn parallel_for = nullptr;  // null: run serially
  int64_t threads = 1;                    // threads that parallel_for may use
};

inline void serial_for(int64_t begin, int64_t end, int64_t, void* ctx,
                       void (*body)(void*, int64_t, int64_t)) {
  if (begin < end) body(ctx, begin, end);
}

template <typename F>
inline void parallel_for(const Runtime& rt, int64_t begin, int64_t end, int64_t grain, const F& f) {
  auto body = [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); };
  auto fn = rt.parallel_for ? rt.parallel_for : &serial_for;
  fn(begin, end, grain, const_cast<void*>(static_cast<const void*>(&f)), body);
}

}  // namespace tokcore
