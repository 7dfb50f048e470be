// CUDA launchers of the fused H&E stain augmentation (math in hed.h). Device pointers to
// contiguous buffers: N images of 3 * hw elements, planar or interleaved; out may be x.
#pragma once
#include <cstdint>

namespace pyfastscan {

// tables: (N, 3, 3, 256) float32.
void hed_augment_u8_cuda(const uint8_t* x, uint8_t* out, const float* tables, int64_t n, int64_t hw,
                         bool interleaved, void* stream);

// m: (N, 3, 3), k: (N, 3), in the image dtype (float64 when is_f64, else float32).
void hed_augment_float_cuda(const void* x, void* out, const void* m, const void* k, bool is_f64, int64_t n,
                            int64_t hw, bool interleaved, void* stream);

}  // namespace pyfastscan
