// Index math of the anchor operations (DESIGN.md 2.1), shared by the CPU and CUDA
// kernels so that the CPU tests cover the arithmetic the GPU kernels run.
//
// Per axis, an anchor operation has kernel size K, dilation d, anchor stride s_a and
// operating distance d_a (s_a, d_a >= 1). Output index p reads input positions
//     start(p) = (p / d_a) * s_a + (p % d_a),   tap(p, t) = start(p) + d * t.
// When s_a < d_a (the paper plan's reconstruction layer for alpha > its stride),
// neighbouring groups overlap and start(p) is not monotonic.
#pragma once
#include <cstdint>

#include "hd.h"

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

// Number of outputs: the longest prefix of p whose taps all lie inside [0, n-1].
// (For s_a >= d_a every valid p is in it.) With m = n - 1 - d*(K-1), group g
// (outputs g*d_a .. g*d_a + d_a-1, starts g*s_a .. g*s_a + d_a-1) is whole when
// g*s_a + d_a - 1 <= m: groups 0 .. full-1 are whole, then the next group
// contributes the outputs whose start is <= m.
PFS_HD int64_t anchor_out_len(int64_t n, const AnchorAxis& a) {
  const int64_t m = n - 1 - a.dilation * (a.kernel - 1);
  if (m < 0) return 0;
  const int64_t full = m >= a.operating_distance - 1 ? (m - a.operating_distance + 1) / a.anchor_stride + 1 : 0;
  const int64_t rest = m - full * a.anchor_stride + 1;  // starts of group `full` that are <= m
  return full * a.operating_distance + (rest <= 0 ? 0 : (rest < a.operating_distance ? rest : a.operating_distance));
}

}  // namespace pyfastscan
