// Mitosis candidate detector of Tellez et al. 2018, Sec. IV-A (reference:
// pyfastscan/reference/candidates.py).
#pragma once
#include <cstdint>
#include <vector>

namespace pyfastscan {

// Repeatedly take the darkest pixel not yet suppressed (intensity = R + G + B, ties in
// raster order) while its intensity is below `below`, record it, and suppress the disk
// dx^2 + dy^2 <= r2 around it. Pixels are visited in one counting sort by intensity
// (stable, so raster order breaks ties): O(N + suppressed area). Returns the picked
// pixels' raster indices in order.
std::vector<int64_t> candidates_cpu(const uint16_t* intensity, int64_t h, int64_t w, double below, double r2);

}  // namespace pyfastscan
