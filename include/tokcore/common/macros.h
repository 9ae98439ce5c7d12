// Portability macros shared by the CPU and CUDA builds of the torch-free core.
#pragma once

#if defined(__CUDACC__)
#define TOKCORE_HD __host__ __device__ __forceinline__
#define TOKCORE_DEVICE_CODE 1
#else
#define TOKCORE_HD inline
#define TOKCORE_DEVICE_CODE 0
#endif
