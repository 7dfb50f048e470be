// CPU kernels of the fused H&E stain augmentation (DESIGN.md 3; math in hed.h).
// N images of hw pixels, each image contiguous: planar (3, hw) or interleaved (hw, 3).
// One pass: each pixel's three channels are read, then its three outputs written, so
// out may alias x (in place).
#pragma once
#include <cstdint>

namespace pyfastscan {

// tables: (n, 3, 3, 256) floats, see hed.h.
void hed_augment_u8_cpu(const uint8_t* x, uint8_t* out, int64_t n, int64_t hw, bool interleaved,
                        const float* tables);

// m: (n, 3, 3) and k: (n, 3) in T, see hed.h. x holds values in [0, 1].
template <typename T>
void hed_augment_float_cpu(const T* x, T* out, int64_t n, int64_t hw, bool interleaved, const T* m,
                           const T* k);

}  // namespace pyfastscan
