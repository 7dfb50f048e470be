// CUDA kernels of the anchor operations (DESIGN.md 2.1). Compiled in CI, not run on the
// development machines (no GPU); the per-element index math lives in anchor_index.h and
// is exercised by the CPU tests.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "anchor_cuda.h"

namespace pyfastscan {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T narrow(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void anchor_pool2d_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t nc, int64_t h,
                                     int64_t w, int64_t ho, int64_t wo, AnchorAxis ay, AnchorAxis ax,
                                     bool average) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = nc * ho * wo;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t q = idx % wo, p = (idx / wo) % ho, i = idx / (wo * ho);
    const T* base = x + i * h * w + anchor_start(p, ay) * w + anchor_start(q, ax);
    if (average) {
      acc_t s = 0;
      for (int64_t ty = 0; ty < ay.kernel; ++ty)
        for (int64_t tx = 0; tx < ax.kernel; ++tx) s += widen(base[ty * ay.dilation * w + tx * ax.dilation]);
      out[idx] = narrow<T>(s / acc_t(ay.kernel * ax.kernel));
    } else {
      T best = base[0];
      acc_t bv = widen(best);
      for (int64_t ty = 0; ty < ay.kernel; ++ty)
        for (int64_t tx = 0; tx < ax.kernel; ++tx) {
          const T v = base[ty * ay.dilation * w + tx * ax.dilation];
          const acc_t fv = widen(v);
          if (!isnan(bv) && (fv > bv || isnan(fv))) { best = v; bv = fv; }
        }
      out[idx] = best;
    }
  }
}

// Tiled implicit GEMM: rows m = (n, p, q) output positions, columns o = output channels,
// reduction k = (c, ty, tx). A[m, k] = x[n, c, tap_y(p, ty), tap_x(q, tx)], B[k, o] = w[o, k].
constexpr int TILE = 16;

template <typename T>
__global__ void anchor_conv2d_kernel(const T* __restrict__ x, const T* __restrict__ wt,
                                     const T* __restrict__ bias, T* __restrict__ out, int64_t n, int64_t c,
                                     int64_t h, int64_t w, int64_t o, int64_t ho, int64_t wo, AnchorAxis ay,
                                     AnchorAxis ax) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t as[TILE][TILE + 1];
  __shared__ acc_t bs[TILE][TILE + 1];
  const int64_t kk = ay.kernel * ax.kernel, ktot = c * kk, mtot = n * ho * wo;
  const int ty_ = threadIdx.y, tx_ = threadIdx.x;
  const int64_t m = blockIdx.x * (int64_t)TILE + ty_;   // this thread's output position
  const int64_t oc = blockIdx.y * (int64_t)TILE + tx_;  // this thread's output channel
  // Position loaded into the A tile by this thread (row ty_ of the tile).
  int64_t bn = 0, p = 0, q = 0;
  if (m < mtot) { q = m % wo; p = (m / wo) % ho; bn = m / (wo * ho); }
  const int64_t ob = blockIdx.y * (int64_t)TILE + ty_;  // output channel loaded into B (transposed)
  acc_t acc = 0;
  for (int64_t k0 = 0; k0 < ktot; k0 += TILE) {
    const int64_t ka = k0 + tx_;
    acc_t a = 0;
    if (m < mtot && ka < ktot) {
      const int64_t ch = ka / kk, t = ka % kk, ky = t / ax.kernel, kx = t % ax.kernel;
      a = widen(x[((bn * c + ch) * h + anchor_tap(p, ky, ay)) * w + anchor_tap(q, kx, ax)]);
    }
    as[ty_][tx_] = a;
    bs[tx_][ty_] = (ob < o && ka < ktot) ? widen(wt[ob * ktot + ka]) : acc_t(0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < TILE; ++k) acc += as[ty_][k] * bs[k][tx_];
    __syncthreads();
  }
  if (m < mtot && oc < o) {
    if (bias != nullptr) acc += widen(bias[oc]);
    out[((bn * o + oc) * ho + p) * wo + q] = narrow<T>(acc);
  }
}

template <typename T>
void launch_pool(const void* x, void* out, int64_t nc, int64_t h, int64_t w, AnchorAxis ay, AnchorAxis ax,
                 bool average, cudaStream_t s) {
  const int64_t ho = anchor_out_len(h, ay), wo = anchor_out_len(w, ax), total = nc * ho * wo;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  anchor_pool2d_kernel<T><<<(unsigned)(blocks < 65535 ? blocks : 65535), threads, 0, s>>>(
      static_cast<const T*>(x), static_cast<T*>(out), nc, h, w, ho, wo, ay, ax, average);
}

template <typename T>
void launch_conv(const void* x, const void* wt, const void* bias, void* out, int64_t n, int64_t c, int64_t h,
                 int64_t w, int64_t o, AnchorAxis ay, AnchorAxis ax, cudaStream_t s) {
  const int64_t ho = anchor_out_len(h, ay), wo = anchor_out_len(w, ax), mtot = n * ho * wo;
  if (mtot == 0 || o == 0) return;
  dim3 block(TILE, TILE);
  dim3 grid((unsigned)((mtot + TILE - 1) / TILE), (unsigned)((o + TILE - 1) / TILE));
  anchor_conv2d_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(wt),
                                                  static_cast<const T*>(bias), static_cast<T*>(out), n, c, h,
                                                  w, o, ho, wo, ay, ax);
}

}  // namespace

void anchor_pool2d_cuda(const void* x, void* out, CudaDtype dtype, int64_t nc, int64_t h, int64_t w,
                        AnchorAxis ay, AnchorAxis ax, bool average, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CudaDtype::f32: launch_pool<float>(x, out, nc, h, w, ay, ax, average, s); break;
    case CudaDtype::f64: launch_pool<double>(x, out, nc, h, w, ay, ax, average, s); break;
    case CudaDtype::bf16: launch_pool<__nv_bfloat16>(x, out, nc, h, w, ay, ax, average, s); break;
  }
}

void anchor_conv2d_cuda(const void* x, const void* weight, const void* bias, void* out, CudaDtype dtype,
                        int64_t n, int64_t c, int64_t h, int64_t w, int64_t o, AnchorAxis ay, AnchorAxis ax,
                        void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CudaDtype::f32: launch_conv<float>(x, weight, bias, out, n, c, h, w, o, ay, ax, s); break;
    case CudaDtype::f64: launch_conv<double>(x, weight, bias, out, n, c, h, w, o, ay, ax, s); break;
    case CudaDtype::bf16: launch_conv<__nv_bfloat16>(x, weight, bias, out, n, c, h, w, o, ay, ax, s); break;
  }
}

const char* cuda_last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace pyfastscan
