// Window tests of the mitotic hotspot counts (DESIGN.md 4), written as the reference
// (pyfastscan/reference/hotspot.py) writes them, in float64, so that the fast kernels take
// the same decision on every boundary. Compile without floating-point contraction
// (-ffp-contract=off): an FMA would round d*d + e*e differently from numpy.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace pyfastscan {

struct HotspotWindow {
  bool circle;
  double r2;              // circle: squared radius, px^2
  double half_w, half_h;  // rect: half sides, px
};

PFS_HD double grid_centre(int64_t j, double step) { return (static_cast<double>(j) + 0.5) * step; }

// Does grid row i reach point y at all (circle: dy^2 <= r2; rect: |dy| <= half_h)?
PFS_HD bool row_reaches(double dy, const HotspotWindow& w) {
  return w.circle ? dy * dy <= w.r2 : fabs(dy) <= w.half_h;
}

// Is the centre (x offset dx) inside, given the row's dy?
PFS_HD bool inside(double dx, double dy, const HotspotWindow& w) {
  return w.circle ? dy * dy + dx * dx <= w.r2 : (fabs(dy) <= w.half_h && fabs(dx) <= w.half_w);
}

// Columns [*lo, *hi] of centres inside the window of a point at x on a row at offset dy
// (empty when *lo > *hi), clipped to [0, n-1]. An estimate from sqrt, then corrected with
// the exact test: inside() is monotone in |c_j - x| on each side of x, as computed.
PFS_HD void window_span(double x, double dy, const HotspotWindow& w, double step, int64_t n, int64_t* lo,
                        int64_t* hi) {
  const double half = w.circle ? sqrt(fmax(0.0, w.r2 - dy * dy)) : w.half_w;
  int64_t a = static_cast<int64_t>(ceil((x - half) / step - 0.5));
  int64_t b = static_cast<int64_t>(floor((x + half) / step - 0.5));
  a = a < 0 ? 0 : (a > n ? n : a);
  b = b < -1 ? -1 : (b > n - 1 ? n - 1 : b);
  while (a > 0 && inside(grid_centre(a - 1, step) - x, dy, w)) --a;
  while (a < n && a <= b && !inside(grid_centre(a, step) - x, dy, w)) ++a;
  while (b < n - 1 && inside(grid_centre(b + 1, step) - x, dy, w)) ++b;
  while (b >= a && !inside(grid_centre(b, step) - x, dy, w)) --b;
  *lo = a;
  *hi = b;
}

}  // namespace pyfastscan
