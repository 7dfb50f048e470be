// CPU kernels of the anchor operations (DESIGN.md 2.1). Buffers are contiguous.
#pragma once
#include <cstddef>
#include <cstdint>

#include "anchor_index.h"
#include "bf16.h"

namespace pyfastscan {

// out[nc, p, q] = max (or mean) over taps of x[nc, tap_y(p, ty), tap_x(q, tx)].
// x: (NC, H, W); out: (NC, Ho, Wo) with Ho, Wo from anchor_out_len.
template <typename T>
void anchor_pool2d_cpu(const T* x, T* out, int64_t nc, int64_t h, int64_t w,
                       const AnchorAxis& ay, const AnchorAxis& ax, bool average);

// Anchor im2col for output rows [row0, row1): col[n, (c*Ky + ty)*Kx + tx, (p-row0)*Wo + q]
// = x[n, c, tap_y(p, ty), tap_x(q, tx)]. Copies bits, so one instantiation per
// element size serves every dtype. x: (N, C, H, W); col: (N, C*Ky*Kx, (row1-row0)*Wo).
void anchor_im2col_cpu(const void* x, void* col, size_t elem_size, int64_t n, int64_t c,
                       int64_t h, int64_t w, const AnchorAxis& ay, const AnchorAxis& ax,
                       int64_t row0, int64_t row1);

}  // namespace pyfastscan
