// CPU kernel of the mitotic hotspot counts (DESIGN.md 4; window tests in hotspot.h).
#pragma once
#include <cstdint>

#include "hotspot.h"

namespace pyfastscan {

// Counts of grid rows [row0, row1) into out ((row1 - row0) x n_cols, int32): for every
// row, the points that reach it (a binary search in ys, sorted ascending) add +1 / -1 at
// the ends of their column span in a difference array, then a prefix sum. O(D*R + N).
// xs, ys: the D points, sorted by y.
void hotspot_rows_cpu(const double* xs, const double* ys, int64_t d, double step, int64_t n_cols, int64_t row0,
                      int64_t row1, const HotspotWindow& w, int32_t* out);

}  // namespace pyfastscan
