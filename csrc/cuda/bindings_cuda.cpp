// pybind11 module of the CUDA build: pyfastscan._C_cuda. Takes device pointers (as
// integers), shapes, the CUDA device index of the pointers and a stream handle of that
// device; compiled by the host compiler, the kernels by nvcc. Every launcher makes `device`
// current for the launch (DeviceGuard) and restores the caller's device: a tensor on
// cuda:1 while cuda:0 is current must launch on cuda:1.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "anchor_cuda.h"
#include "stain_cuda.h"

namespace py = pybind11;
using namespace pyfastscan;

namespace {
using Axis = std::tuple<int64_t, int64_t, int64_t, int64_t>;
AnchorAxis to_axis(const Axis& a) { return {std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a)}; }
const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
void check_launch(const char* what) {
  const std::string err = cuda_last_error();
  if (!err.empty()) throw std::runtime_error(std::string("pyfastscan._C_cuda.") + what + ": " + err);
}

// Makes `device` the current CUDA device for the scope, like c10::cuda::CUDAGuard.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* what) {
    cudaError_t e = cudaGetDevice(&prev_);
    if (e == cudaSuccess && prev_ != device) e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear it: the launch did not happen
      throw std::runtime_error(std::string("pyfastscan._C_cuda.") + what + ": cannot make device " +
                               std::to_string(device) + " current: " + cudaGetErrorString(e));
    }
    restore_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyfastscan CUDA kernels. Pointers are device addresses; see pyfastscan/ops for the API.";
  m.def("anchor_pool2d", [](uintptr_t x, uintptr_t out, int dtype, int64_t nc, int64_t h, int64_t w, Axis ay,
                            Axis ax, bool average, int device, uintptr_t stream) {
    {
      py::gil_scoped_release nogil;
      DeviceGuard guard(device, "anchor_pool2d");
      anchor_pool2d_cuda(cptr(x), mptr(out), static_cast<CudaDtype>(dtype), nc, h, w, to_axis(ay), to_axis(ax),
                         average, mptr(stream));
    }
    check_launch("anchor_pool2d");
  });
  m.def("anchor_conv2d", [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t out, int dtype, int64_t n,
                            int64_t c, int64_t h, int64_t w, int64_t o, Axis ay, Axis ax, int device,
                            uintptr_t stream) {
    {
      py::gil_scoped_release nogil;
      DeviceGuard guard(device, "anchor_conv2d");
      anchor_conv2d_cuda(cptr(x), cptr(weight), bias ? cptr(bias) : nullptr, mptr(out),
                         static_cast<CudaDtype>(dtype), n, c, h, w, o, to_axis(ay), to_axis(ax), mptr(stream));
    }
    check_launch("anchor_conv2d");
  });
  m.def("hed_augment_u8", [](uintptr_t x, uintptr_t out, uintptr_t tables, int64_t n, int64_t hw, bool interleaved,
                             int device, uintptr_t stream) {
    {
      py::gil_scoped_release nogil;
      DeviceGuard guard(device, "hed_augment_u8");
      hed_augment_u8_cuda(static_cast<const uint8_t*>(cptr(x)), static_cast<uint8_t*>(mptr(out)),
                          static_cast<const float*>(cptr(tables)), n, hw, interleaved, mptr(stream));
    }
    check_launch("hed_augment_u8");
  });
  m.def("hed_augment_float", [](uintptr_t x, uintptr_t out, uintptr_t mat, uintptr_t k, bool is_f64, int64_t n,
                                int64_t hw, bool interleaved, int device, uintptr_t stream) {
    {
      py::gil_scoped_release nogil;
      DeviceGuard guard(device, "hed_augment_float");
      hed_augment_float_cuda(cptr(x), mptr(out), cptr(mat), cptr(k), is_f64, n, hw, interleaved, mptr(stream));
    }
    check_launch("hed_augment_float");
  });
  m.def("build_info", []() {
    py::dict d;
    d["cudart_version"] = static_cast<long>(CUDART_VERSION);
#ifdef PYFASTSCAN_CUDA_ARCHS
    d["cuda_architectures"] = PYFASTSCAN_CUDA_ARCHS;
#endif
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    d["device_count"] = e == cudaSuccess ? count : 0;
    d["device_error"] = e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
    return d;
  });
}
