// Per-pixel math of the fused H&E stain augmentation (DESIGN.md 3), shared by the CPU
// and CUDA kernels (the Triton kernel in kernels/stain.py transcribes the same steps).
//
// With L = -ln(1e-6), OD_i = ln(max(P_i, 1e-6)) / -L, hed = OD @ hed_from_rgb,
// hed' = alpha * hed + beta and rgb' = exp(-L hed' @ rgb_from_hed), the steps fold into one
// affine map in log space, with per-image M = hed_from_rgb diag(alpha) rgb_from_hed and
// k = -L (beta @ rgb_from_hed):
//     rgb'_j = clip(exp(sum_i ln(max(P_i, 1e-6)) * M_ij + k_j), 0, 1).
// For uint8 images exp of a sum is a product of per-channel factors, so each image gets
// nine 256-entry tables (computed in float64 by pyfastscan/ops/stain.py, rounded once):
//     T[i][j][v] = exp(ln(max(v / 255, 1e-6)) * M_ij)   (times 255 exp(k_j) for i = 0)
//     out_j = round_half_even(clip((T[0][j][r] * T[1][j][g]) * T[2][j][b], 0, 255)).
// The products are evaluated in this order on every backend, so uint8 outputs are the
// same bits everywhere; alpha = 1, beta = 0 gives T = (v, 1, 1) and returns the input.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace pyfastscan {

constexpr int kHedTable = 256;  // entries per table; tables laid out [i][j][v]

PFS_HD uint8_t hed_u8_channel(const float* t, int j, uint8_t r, uint8_t g, uint8_t b) {
  const float y = (t[(0 * 3 + j) * kHedTable + r] * t[(1 * 3 + j) * kHedTable + g]) * t[(2 * 3 + j) * kHedTable + b];
  // Written so that it compiles to maxss / minss, branchless (the nested comparison it
  // replaces compiled to branches on whether a pixel saturates, mispredicted on real
  // images: 2.3x the time). Tables are finite and positive: no NaN.
  const float lo = y > 0.f ? y : 0.f;
  const float c = lo < 255.f ? lo : 255.f;
  using std::rint;
  return static_cast<uint8_t>(rint(c));
}

// m: M row-major [i][j]; k: the 3 offsets; l0..l2 = hed_log(P_i). Returns channel j of rgb'.
template <typename T>
PFS_HD T hed_float_channel(const T* m, const T* k, int j, T l0, T l1, T l2) {
  using std::exp;
  const T e = l0 * m[0 * 3 + j] + l1 * m[1 * 3 + j] + l2 * m[2 * 3 + j] + k[j];
  const T y = exp(e);
  return y > T(1) ? T(1) : y;  // exp > 0: only the upper clip can act
}

template <typename T>
PFS_HD T hed_log(T p) {  // ln(max(p, 1e-6))
  using std::log;
  return log(p > T(1e-6) ? p : T(1e-6));
}

}  // namespace pyfastscan
