// Index math of the anchor operations (DESIGN.md 2.1), shared by the CPU and CUDA
// kernels so that the CPU tests cover the arithmetic the GPU kernels run.
//
// Per axis, an anchor operation has kernel size K, dilation d, anchor stride s_a and
// operating distance d_a (s_a >= d_a >= 1). Output index p reads input positions
//     start(p) = (p / d_a) * s_a + (p % d_a),   tap(p, t) = start(p) + d * t.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PFS_HD __host__ __device__ __forceinline__
#else
#define PFS_HD inline
#endif

namespace pyfastscan {

struct AnchorAxis {
  int64_t kernel;
  int64_t dilation;
  int64_t anchor_stride;
  int64_t operating_distance;
};

PFS_HD int64_t anchor_start(int64_t p, const AnchorAxis& a) {
  return (p / a.operating_distance) * a.anchor_stride + (p % a.operating_distance);
}

PFS_HD int64_t anchor_tap(int64_t p, int64_t t, const AnchorAxis& a) {
  return anchor_start(p, a) + a.dilation * t;
}

// Number of outputs p with tap(p, K-1) <= n-1. They form a prefix (s_a >= d_a):
// with m = n - 1 - d*(K-1), groups q < m / s_a are full (d_a outputs each) and the
// last group holds min(d_a, m % s_a + 1).
PFS_HD int64_t anchor_out_len(int64_t n, const AnchorAxis& a) {
  const int64_t m = n - 1 - a.dilation * (a.kernel - 1);
  if (m < 0) return 0;
  const int64_t q = m / a.anchor_stride, rem = m % a.anchor_stride;
  return q * a.operating_distance + (rem + 1 < a.operating_distance ? rem + 1 : a.operating_distance);
}

}  // namespace pyfastscan
