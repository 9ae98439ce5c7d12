// Portability macros shared by the CPU and CUDA builds of the torch-free core.
#pragma once

#if defined(__CUDACC__)
#define TOKCORE_HD __host__ __device__ __forceinline__
#define TOKCORE_DEVICE_CODE 1
#else
#define TOKCORE_HD inline
#define TOKCORE_DEVICE_CODE 0
#endif

// Loop unrolling hints: full (TOKCORE_UNROLL) or by n (TOKCORE_UNROLL_N(n)).
// nvcc needs them on the GPU; host compilers decide for themselves.
#define TOKCORE_PRAGMA(x) _Pragma(#x)
#if defined(__CUDACC__)
#define TOKCORE_UNROLL TOKCORE_PRAGMA(unroll)
#define TOKCORE_UNROLL_N(n) TOKCORE_PRAGMA(unroll n)
#else
#define TOKCORE_UNROLL
#define TOKCORE_UNROLL_N(n)
#endif
