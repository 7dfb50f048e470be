// The one pybind11 module of the CPU build: pyfastscan._C.
// Functions take numpy buffers (C-contiguous; bfloat16 passed as int16/uint16 bits
// with bf16=True), never libtorch types, so the module builds in seconds and does not
// pin a torch ABI. Shape agreement is checked here; argument values are validated once,
// in the Python wrappers (pyfastscan/ops/).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu/anchor_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace pyfastscan;

namespace {

using Axis = std::tuple<int64_t, int64_t, int64_t, int64_t>;  // kernel, dilation, s_a, d_a

AnchorAxis to_axis(const Axis& a) {
  return {std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a)};
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("pyfastscan._C: " + what);
}

void check_buffer(const py::array& a, const char* name, py::ssize_t ndim) {
  require(a.ndim() == ndim, std::string(name) + " must have " + std::to_string(ndim) + " dimensions");
  require((a.flags() & py::array::c_style) != 0, std::string(name) + " must be C-contiguous");
}

void anchor_pool2d(py::array x, py::array out, Axis axis_y, Axis axis_x, bool average, bool bf16_bits) {
  check_buffer(x, "x", 3);
  check_buffer(out, "out", 3);
  require(out.writeable(), "out must be writeable");
  require(x.dtype().is(out.dtype()), "x and out must have the same dtype");
  const AnchorAxis ay = to_axis(axis_y), ax = to_axis(axis_x);
  const int64_t nc = x.shape(0), h = x.shape(1), w = x.shape(2);
  require(out.shape(0) == nc && out.shape(1) == anchor_out_len(h, ay) && out.shape(2) == anchor_out_len(w, ax),
          "out has the wrong shape");
  enum class Kind { f32, f64, bf16 } kind;
  if (bf16_bits) {
    require(x.itemsize() == 2, "bf16 buffers must hold 2-byte elements");
    kind = Kind::bf16;
  } else if (x.dtype().is(py::dtype::of<float>())) {
    kind = Kind::f32;
  } else if (x.dtype().is(py::dtype::of<double>())) {
    kind = Kind::f64;
  } else {
    throw std::invalid_argument("pyfastscan._C: anchor_pool2d takes float32, float64 or bf16 bits");
  }
  const void* xp = x.data();
  void* op = out.mutable_data();
  py::gil_scoped_release nogil;
  switch (kind) {
    case Kind::f32: anchor_pool2d_cpu(static_cast<const float*>(xp), static_cast<float*>(op), nc, h, w, ay, ax, average); break;
    case Kind::f64: anchor_pool2d_cpu(static_cast<const double*>(xp), static_cast<double*>(op), nc, h, w, ay, ax, average); break;
    case Kind::bf16: anchor_pool2d_cpu(static_cast<const bf16*>(xp), static_cast<bf16*>(op), nc, h, w, ay, ax, average); break;
  }
}

void anchor_im2col(py::array x, py::array col, Axis axis_y, Axis axis_x, int64_t row0, int64_t row1) {
  check_buffer(x, "x", 4);
  check_buffer(col, "col", 3);
  require(col.writeable(), "col must be writeable");
  require(x.itemsize() == col.itemsize(), "x and col must have the same element size");
  require(x.itemsize() == 2 || x.itemsize() == 4 || x.itemsize() == 8, "element size must be 2, 4 or 8 bytes");
  const AnchorAxis ay = to_axis(axis_y), ax = to_axis(axis_x);
  const int64_t n = x.shape(0), c = x.shape(1), h = x.shape(2), w = x.shape(3);
  const int64_t ho = anchor_out_len(h, ay), wo = anchor_out_len(w, ax);
  require(0 <= row0 && row0 <= row1 && row1 <= ho, "rows out of range");
  require(col.shape(0) == n && col.shape(1) == c * ay.kernel * ax.kernel && col.shape(2) == (row1 - row0) * wo,
          "col has the wrong shape");
  const void* xp = x.data();
  void* cp = col.mutable_data();
  const size_t es = static_cast<size_t>(x.itemsize());
  py::gil_scoped_release nogil;
  anchor_im2col_cpu(xp, cp, es, n, c, h, w, ay, ax, row0, row1);
}

py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["cxx_standard"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  d["openmp"] = static_cast<long>(_OPENMP);
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = py::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastscan CPU kernels (C++17, OpenMP). See pyfastscan/ops for the public API.";
  m.def("anchor_pool2d", &anchor_pool2d, py::arg("x"), py::arg("out"), py::arg("axis_y"), py::arg("axis_x"),
        py::arg("average"), py::arg("bf16"));
  m.def("anchor_im2col", &anchor_im2col, py::arg("x"), py::arg("col"), py::arg("axis_y"), py::arg("axis_x"),
        py::arg("row0"), py::arg("row1"));
  m.def("anchor_out_len", [](int64_t n, Axis a) { return anchor_out_len(n, to_axis(a)); }, py::arg("n"),
        py::arg("axis"));
  m.def("build_info", &build_info);
}
