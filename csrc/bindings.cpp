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
#include <vector>
#include <algorithm>

#include "cpu/anchor_cpu.h"
#include "cpu/stain_cpu.h"
#include "cpu/hotspot_cpu.h"
#include "cpu/candidates_cpu.h"
#include "hed.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace pyfastscan;

#ifndef PYFASTSCAN_ISA
#define PYFASTSCAN_ISA "march=? isa="
#endif
// The instruction sets this build may use, readable in the file without loading it:
// pyfastscan/_native.py refuses to import _C on a CPU that lacks one (CMakeLists.txt).
extern "C" __attribute__((used)) const char pyfastscan_isa_marker[] = "PYFASTSCAN-ISA[" PYFASTSCAN_ISA "]";

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

// x, out: (N, ...) C-contiguous, 3 * hw elements per image; returns hw.
int64_t check_images(const py::array& x, const py::array& out) {
  require(x.ndim() >= 2 && (x.flags() & py::array::c_style) != 0, "x must be C-contiguous with a batch axis");
  require((out.flags() & py::array::c_style) != 0 && out.writeable(), "out must be C-contiguous and writeable");
  require(x.dtype().is(out.dtype()) && x.size() == out.size() && out.shape(0) == x.shape(0),
          "x and out must have the same dtype and size");
  const int64_t n = x.shape(0);
  require(n == 0 || x.size() % (3 * n) == 0, "each image must hold 3 * H * W values");
  return n == 0 ? 0 : x.size() / (3 * n);
}

void hed_augment_u8(py::array x, py::array out, py::array tables, bool interleaved) {
  const int64_t hw = check_images(x, out), n = x.shape(0);
  require(x.dtype().is(py::dtype::of<uint8_t>()), "x must be uint8");
  require(tables.dtype().is(py::dtype::of<float>()), "tables must be float32");
  check_buffer(tables, "tables", 4);
  require(tables.shape(0) == n && tables.shape(1) == 3 && tables.shape(2) == 3 && tables.shape(3) == kHedTable,
          "tables must have shape (N, 3, 3, 256)");
  const auto* xp = static_cast<const uint8_t*>(x.data());
  auto* op = static_cast<uint8_t*>(out.mutable_data());
  const auto* tp = static_cast<const float*>(tables.data());
  py::gil_scoped_release nogil;
  hed_augment_u8_cpu(xp, op, n, hw, interleaved, tp);
}

template <typename T>
void hed_augment_float_t(const py::array& x, py::array& out, const py::array& m, const py::array& k, bool interleaved) {
  const int64_t hw = check_images(x, out), n = x.shape(0);
  check_buffer(m, "m", 3);
  check_buffer(k, "k", 2);
  require(m.dtype().is(x.dtype()) && k.dtype().is(x.dtype()), "m and k must have the dtype of x");
  require(m.shape(0) == n && m.shape(1) == 3 && m.shape(2) == 3 && k.shape(0) == n && k.shape(1) == 3,
          "m must be (N, 3, 3) and k (N, 3)");
  const T* xp = static_cast<const T*>(x.data());
  T* op = static_cast<T*>(out.mutable_data());
  const T *mp = static_cast<const T*>(m.data()), *kp = static_cast<const T*>(k.data());
  py::gil_scoped_release nogil;
  hed_augment_float_cpu(xp, op, n, hw, interleaved, mp, kp);
}

void hed_augment_float(py::array x, py::array out, py::array m, py::array k, bool interleaved) {
  if (x.dtype().is(py::dtype::of<float>())) return hed_augment_float_t<float>(x, out, m, k, interleaved);
  if (x.dtype().is(py::dtype::of<double>())) return hed_augment_float_t<double>(x, out, m, k, interleaved);
  throw std::invalid_argument("pyfastscan._C: hed_augment_float takes float32 or float64");
}

void hotspot_rows(py::array_t<double, py::array::c_style> xs, py::array_t<double, py::array::c_style> ys,
                  double step, int64_t n_cols, int64_t row0, int64_t row1, bool circle, double r2, double half_w,
                  double half_h, py::array out) {
  require(xs.ndim() == 1 && ys.ndim() == 1 && xs.shape(0) == ys.shape(0), "xs and ys must be 1-D of equal length");
  check_buffer(out, "out", 2);
  require(out.dtype().is(py::dtype::of<int32_t>()) && out.writeable(), "out must be writeable int32");
  require(0 <= row0 && row0 <= row1 && out.shape(0) == row1 - row0 && out.shape(1) == n_cols,
          "out must have shape (row1 - row0, n_cols)");
  require(step > 0, "step must be positive");
  const double *xp = xs.data(), *yp = ys.data();
  const int64_t d = xs.shape(0);
  auto* op = static_cast<int32_t*>(out.mutable_data());
  const HotspotWindow w{circle, r2, half_w, half_h};
  py::gil_scoped_release nogil;
  hotspot_rows_cpu(xp, yp, d, step, n_cols, row0, row1, w, op);
}

py::array_t<int64_t> mitosis_candidates(py::array_t<uint16_t, py::array::c_style> intensity, double below, double r2) {
  require(intensity.ndim() == 2, "intensity must be 2-D");
  require(r2 >= 0, "r2 must be non-negative");
  const int64_t h = intensity.shape(0), w = intensity.shape(1);
  const uint16_t* p = intensity.data();
  for (int64_t i = 0; i < h * w; ++i) require(p[i] <= 765, "intensity must be R + G + B of uint8 (at most 765)");
  std::vector<int64_t> picked;
  {
    py::gil_scoped_release nogil;
    picked = candidates_cpu(p, h, w, below, r2);
  }
  py::array_t<int64_t> out(static_cast<py::ssize_t>(picked.size()));
  std::copy(picked.begin(), picked.end(), out.mutable_data());
  return out;
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
  d["target"] = std::string(PYFASTSCAN_ISA);
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
  m.def("hed_augment_u8", &hed_augment_u8, py::arg("x"), py::arg("out"), py::arg("tables"), py::arg("interleaved"));
  m.def("hed_augment_float", &hed_augment_float, py::arg("x"), py::arg("out"), py::arg("m"), py::arg("k"),
        py::arg("interleaved"));
  m.def("mitosis_candidates", &mitosis_candidates, py::arg("intensity"), py::arg("below"), py::arg("r2"),
        "Tellez candidate detector: raster indices of the picked pixels (csrc/cpu/candidates_cpu.h)");
  m.def("hotspot_rows", &hotspot_rows, py::arg("xs"), py::arg("ys"), py::arg("step"), py::arg("n_cols"),
        py::arg("row0"), py::arg("row1"), py::arg("circle"), py::arg("r2"), py::arg("half_w"), py::arg("half_h"),
        py::arg("out"));
  m.def("build_info", &build_info);
}
