// PFS_HD marks functions shared by the CPU and CUDA kernels: __host__ __device__
// under nvcc, plain inline elsewhere, so the CPU tests cover the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define PFS_HD __host__ __device__ __forceinline__
#else
#define PFS_HD inline
#endif
