// CPU kernels of the anchor operations. Parallel over (image*channel, output row).
#include "anchor_cpu.h"

#include <vector>

namespace pyfastscan {

namespace {

// NaN-propagating max that keeps the winning element (bitwise equal to torch.amax) and
// compiles to selects, so the loops below vectorise.
template <typename T>
inline T max_keep_nan(T best, T v) {
  const auto b = widen(best), f = widen(v);
  return (b != b) ? best : ((f > b || f != f) ? v : best);
}

// Calls body(q, start_x(q)) for every output column, as up to d_a affine runs
// (q = g*d_a + r reads g*s_a + r): plain loops the compiler can vectorise.
template <typename F>
inline void for_each_column(int64_t wo, const AnchorAxis& ax, F&& body) {
  const int64_t da = ax.operating_distance, sa = ax.anchor_stride;
  if (da == sa) {  // start(q) = q
    for (int64_t q = 0; q < wo; ++q) body(q, q);
    return;
  }
  for (int64_t r = 0; r < da && r < wo; ++r)
    for (int64_t q = r, x = r; q < wo; q += da, x += sa) body(q, x);
}

}  // namespace

template <typename T>
void anchor_pool2d_cpu(const T* x, T* out, int64_t nc, int64_t h, int64_t w,
                       const AnchorAxis& ay, const AnchorAxis& ax, bool average) {
  using acc_t = typename acc_type<T>::type;
  const int64_t ho = anchor_out_len(h, ay), wo = anchor_out_len(w, ax);
  if (nc == 0 || ho == 0 || wo == 0) return;
  const acc_t inv_area = acc_t(1) / acc_t(ay.kernel * ax.kernel);

#pragma omp parallel
  {
    std::vector<acc_t> sum(average ? wo : 0);
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < nc; ++i) {
      for (int64_t p = 0; p < ho; ++p) {
        const T* plane = x + i * h * w;
        T* orow = out + (i * ho + p) * wo;
        const int64_t y0 = anchor_start(p, ay);
        // Taps outer, columns inner: each pass is a contiguous (or strided) sweep.
        for (int64_t ty = 0; ty < ay.kernel; ++ty) {
          const T* src_row = plane + (y0 + ty * ay.dilation) * w;
          for (int64_t tx = 0; tx < ax.kernel; ++tx) {
            const T* src = src_row + tx * ax.dilation;
            const bool first = ty == 0 && tx == 0;
            if (average) {
              acc_t* s = sum.data();
              if (first) for_each_column(wo, ax, [&](int64_t q, int64_t xs) { s[q] = widen(src[xs]); });
              else for_each_column(wo, ax, [&](int64_t q, int64_t xs) { s[q] += widen(src[xs]); });
            } else if (first) {
              for_each_column(wo, ax, [&](int64_t q, int64_t xs) { orow[q] = src[xs]; });
            } else {
              for_each_column(wo, ax, [&](int64_t q, int64_t xs) { orow[q] = max_keep_nan(orow[q], src[xs]); });
            }
          }
        }
        if (average)
          for (int64_t q = 0; q < wo; ++q) orow[q] = narrow<T>(sum[q] * inv_area);
      }
    }
  }
}

template void anchor_pool2d_cpu<float>(const float*, float*, int64_t, int64_t, int64_t,
                                       const AnchorAxis&, const AnchorAxis&, bool);
template void anchor_pool2d_cpu<double>(const double*, double*, int64_t, int64_t, int64_t,
                                        const AnchorAxis&, const AnchorAxis&, bool);
template void anchor_pool2d_cpu<bf16>(const bf16*, bf16*, int64_t, int64_t, int64_t,
                                      const AnchorAxis&, const AnchorAxis&, bool);

namespace {
template <typename E>
void im2col_impl(const E* x, E* col, int64_t n, int64_t c, int64_t h, int64_t w,
                 const AnchorAxis& ay, const AnchorAxis& ax, int64_t row0, int64_t row1) {
  const int64_t wo = anchor_out_len(w, ax), rows = row1 - row0, kk = ay.kernel * ax.kernel;
  const int64_t plane_out = rows * wo;
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t ty = 0; ty < ay.kernel; ++ty) {
        const E* plane = x + (b * c + ch) * h * w;
        for (int64_t tx = 0; tx < ax.kernel; ++tx) {
          E* dst = col + ((b * c + ch) * kk + ty * ax.kernel + tx) * plane_out;
          const int64_t dx = tx * ax.dilation;
          for (int64_t p = row0; p < row1; ++p) {
            const E* src = plane + anchor_tap(p, ty, ay) * w + dx;
            E* d = dst + (p - row0) * wo;
            for_each_column(wo, ax, [&](int64_t q, int64_t xs) { d[q] = src[xs]; });
          }
        }
      }
}
}  // namespace

void anchor_im2col_cpu(const void* x, void* col, size_t elem_size, int64_t n, int64_t c,
                       int64_t h, int64_t w, const AnchorAxis& ay, const AnchorAxis& ax,
                       int64_t row0, int64_t row1) {
  switch (elem_size) {
    case 2: im2col_impl(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(col), n, c, h, w, ay, ax, row0, row1); break;
    case 4: im2col_impl(static_cast<const uint32_t*>(x), static_cast<uint32_t*>(col), n, c, h, w, ay, ax, row0, row1); break;
    case 8: im2col_impl(static_cast<const uint64_t*>(x), static_cast<uint64_t*>(col), n, c, h, w, ay, ax, row0, row1); break;
    default: break;  // the binding rejects other sizes
  }
}

}  // namespace pyfastscan
