// CPU kernel of the mitotic hotspot counts. Parallel over grid rows; no atomics.
#include "hotspot_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pyfastscan {

void hotspot_rows_cpu(const double* xs, const double* ys, int64_t d, double step, int64_t n_cols, int64_t row0,
                      int64_t row1, const HotspotWindow& w, int32_t* out) {
  const double reach = w.circle ? std::sqrt(w.r2) : w.half_h;
#pragma omp parallel
  {
    std::vector<int32_t> diff(static_cast<size_t>(n_cols) + 1);
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = row0; i < row1; ++i) {
      std::fill(diff.begin(), diff.end(), 0);
      const double cy = grid_centre(i, step);
      // candidates: |cy - y| <= reach, widened by a margin; row_reaches() decides exactly
      const double margin = 1e-9 * (std::fabs(cy) + reach) + 1e-9;
      const double* first = std::lower_bound(ys, ys + d, cy - reach - margin);
      const double* last = std::upper_bound(first, ys + d, cy + reach + margin);
      for (const double* y = first; y < last; ++y) {
        const double dy = cy - *y;
        if (!row_reaches(dy, w)) continue;
        int64_t lo, hi;
        window_span(xs[y - ys], dy, w, step, n_cols, &lo, &hi);
        if (lo > hi) continue;
        ++diff[lo];
        --diff[hi + 1];
      }
      int32_t* row = out + (i - row0) * n_cols;
      int32_t run = 0;
      for (int64_t j = 0; j < n_cols; ++j) {
        run += diff[j];
        row[j] = run;
      }
    }
  }
}

}  // namespace pyfastscan
