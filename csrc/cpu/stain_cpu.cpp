// CPU kernels of the fused H&E stain augmentation. Parallel over (image, block of pixels).
#include "stain_cpu.h"

#include "hed.h"

namespace pyfastscan {

namespace {

constexpr int64_t kBlock = 16384;  // pixels per parallel work item

// Calls body(i0, i1, i2): the element offsets of channels 0..2 of every pixel in
// [p0, p1) of an image; planar images step 1 per pixel, interleaved ones 3.
template <typename F>
inline void for_pixels(int64_t p0, int64_t p1, int64_t hw, bool interleaved, F&& body) {
  if (interleaved) {
    for (int64_t p = p0; p < p1; ++p) body(3 * p, 3 * p + 1, 3 * p + 2);
  } else {
    for (int64_t p = p0; p < p1; ++p) body(p, hw + p, 2 * hw + p);
  }
}

template <typename F>
inline void parallel_blocks(int64_t n, int64_t hw, F&& body) {
  const int64_t blocks = (hw + kBlock - 1) / kBlock;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < blocks; ++b) body(i, b * kBlock, b * kBlock + kBlock < hw ? b * kBlock + kBlock : hw);
}

}  // namespace

void hed_augment_u8_cpu(const uint8_t* x, uint8_t* out, int64_t n, int64_t hw, bool interleaved,
                        const float* tables) {
  parallel_blocks(n, hw, [&](int64_t i, int64_t p0, int64_t p1) {
    const uint8_t* src = x + i * 3 * hw;
    uint8_t* dst = out + i * 3 * hw;
    const float* t = tables + i * 9 * kHedTable;
    for_pixels(p0, p1, hw, interleaved, [&](int64_t i0, int64_t i1, int64_t i2) {
      const uint8_t r = src[i0], g = src[i1], b = src[i2];
      dst[i0] = hed_u8_channel(t, 0, r, g, b);
      dst[i1] = hed_u8_channel(t, 1, r, g, b);
      dst[i2] = hed_u8_channel(t, 2, r, g, b);
    });
  });
}

template <typename T>
void hed_augment_float_cpu(const T* x, T* out, int64_t n, int64_t hw, bool interleaved, const T* m,
                           const T* k) {
  parallel_blocks(n, hw, [&](int64_t i, int64_t p0, int64_t p1) {
    const T* src = x + i * 3 * hw;
    T* dst = out + i * 3 * hw;
    const T *mi = m + i * 9, *ki = k + i * 3;
    for_pixels(p0, p1, hw, interleaved, [&](int64_t i0, int64_t i1, int64_t i2) {
      const T l0 = hed_log(src[i0]), l1 = hed_log(src[i1]), l2 = hed_log(src[i2]);
      dst[i0] = hed_float_channel(mi, ki, 0, l0, l1, l2);
      dst[i1] = hed_float_channel(mi, ki, 1, l0, l1, l2);
      dst[i2] = hed_float_channel(mi, ki, 2, l0, l1, l2);
    });
  });
}

template void hed_augment_float_cpu<float>(const float*, float*, int64_t, int64_t, bool, const float*, const float*);
template void hed_augment_float_cpu<double>(const double*, double*, int64_t, int64_t, bool, const double*,
                                            const double*);

}  // namespace pyfastscan
