// CUDA launchers of the anchor operations. Pointers are device pointers to contiguous
// buffers; dtype is 0 = float32, 1 = float64, 2 = bfloat16. Launches go on `stream`.
#pragma once
#include <cstdint>

#include "anchor_index.h"

namespace pyfastscan {

enum class CudaDtype : int { f32 = 0, f64 = 1, bf16 = 2 };

// x: (NC, H, W) -> out: (NC, Ho, Wo).
void anchor_pool2d_cuda(const void* x, void* out, CudaDtype dtype, int64_t nc, int64_t h, int64_t w,
                        AnchorAxis ay, AnchorAxis ax, bool average, void* stream);

// Implicit GEMM: x (N, C, H, W), weight (O, C, Ky, Kx), bias (O) or null -> out (N, O, Ho, Wo).
void anchor_conv2d_cuda(const void* x, const void* weight, const void* bias, void* out, CudaDtype dtype,
                        int64_t n, int64_t c, int64_t h, int64_t w, int64_t o, AnchorAxis ay, AnchorAxis ax,
                        void* stream);

// Returns an empty string on success, else the CUDA error of the last launch.
const char* cuda_last_error();

}  // namespace pyfastscan
