// CUDA kernels of the fused H&E stain augmentation: one thread per pixel, grid-stride.
// The per-pixel math (hed.h) is the CPU kernel's, so uint8 outputs are the same bits.
#include <cuda_runtime.h>

#include "hed.h"
#include "stain_cuda.h"

namespace pyfastscan {

namespace {

struct Layout {
  int64_t pix, ch;  // element strides of a pixel and of a channel within an image
};

__global__ void hed_u8_kernel(const uint8_t* x, uint8_t* out, const float* tables, int64_t n, int64_t hw,
                              Layout l) {
  const int64_t total = n * hw;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx / hw, p = idx % hw;
    const int64_t o0 = i * 3 * hw + p * l.pix, o1 = o0 + l.ch, o2 = o0 + 2 * l.ch;
    const float* t = tables + i * 9 * kHedTable;
    const uint8_t r = x[o0], g = x[o1], b = x[o2];
    out[o0] = hed_u8_channel(t, 0, r, g, b);
    out[o1] = hed_u8_channel(t, 1, r, g, b);
    out[o2] = hed_u8_channel(t, 2, r, g, b);
  }
}

template <typename T>
__global__ void hed_float_kernel(const T* x, T* out, const T* m, const T* k, int64_t n, int64_t hw, Layout l) {
  const int64_t total = n * hw;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx / hw, p = idx % hw;
    const int64_t o0 = i * 3 * hw + p * l.pix, o1 = o0 + l.ch, o2 = o0 + 2 * l.ch;
    const T l0 = hed_log(x[o0]), l1 = hed_log(x[o1]), l2 = hed_log(x[o2]);
    out[o0] = hed_float_channel(m + i * 9, k + i * 3, 0, l0, l1, l2);
    out[o1] = hed_float_channel(m + i * 9, k + i * 3, 1, l0, l1, l2);
    out[o2] = hed_float_channel(m + i * 9, k + i * 3, 2, l0, l1, l2);
  }
}

unsigned blocks_for(int64_t total, int threads) {
  const int64_t b = (total + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 ? b : 65535);
}

}  // namespace

void hed_augment_u8_cuda(const uint8_t* x, uint8_t* out, const float* tables, int64_t n, int64_t hw,
                         bool interleaved, void* stream) {
  if (n * hw == 0) return;
  const Layout l = interleaved ? Layout{3, 1} : Layout{1, hw};
  hed_u8_kernel<<<blocks_for(n * hw, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(x, out, tables, n, hw, l);
}

void hed_augment_float_cuda(const void* x, void* out, const void* m, const void* k, bool is_f64, int64_t n,
                            int64_t hw, bool interleaved, void* stream) {
  if (n * hw == 0) return;
  const Layout l = interleaved ? Layout{3, 1} : Layout{1, hw};
  auto s = static_cast<cudaStream_t>(stream);
  if (is_f64)
    hed_float_kernel<double><<<blocks_for(n * hw, 256), 256, 0, s>>>(
        static_cast<const double*>(x), static_cast<double*>(out), static_cast<const double*>(m),
        static_cast<const double*>(k), n, hw, l);
  else
    hed_float_kernel<float><<<blocks_for(n * hw, 256), 256, 0, s>>>(
        static_cast<const float*>(x), static_cast<float*>(out), static_cast<const float*>(m),
        static_cast<const float*>(k), n, hw, l);
}

}  // namespace pyfastscan
