#include "cpu/candidates_cpu.h"

#include <algorithm>
#include <cmath>

namespace pyfastscan {

std::vector<int64_t> candidates_cpu(const uint16_t* intensity, int64_t h, int64_t w, double below, double r2) {
  const int64_t n = h * w;
  constexpr int kLevels = 3 * 255 + 1;
  // counting sort of the dark pixels by intensity, stable in raster order
  std::vector<int64_t> start(kLevels + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (intensity[i] < below) ++start[intensity[i] + 1];
  for (int v = 0; v < kLevels; ++v) start[v + 1] += start[v];
  std::vector<int64_t> order(start[kLevels]);
  for (int64_t i = 0; i < n; ++i)
    if (intensity[i] < below) order[start[intensity[i]]++] = i;
  // half-widths of the disk per row offset: the largest dx with dx^2 + dy^2 <= r2
  const int64_t rmax = static_cast<int64_t>(std::floor(std::sqrt(r2)));
  std::vector<int64_t> half(rmax + 1);
  for (int64_t dy = 0; dy <= rmax; ++dy) {
    int64_t dx = static_cast<int64_t>(std::floor(std::sqrt(std::max(0.0, r2 - double(dy * dy)))));
    while (dx >= 0 && double(dx * dx + dy * dy) > r2) --dx;
    while (double((dx + 1) * (dx + 1) + dy * dy) <= r2) ++dx;
    half[dy] = dx;
  }
  std::vector<uint8_t> gone(n, 0);
  std::vector<int64_t> picked;
  for (int64_t i : order) {
    if (gone[i]) continue;
    picked.push_back(i);
    const int64_t y = i / w, x = i % w;
    for (int64_t dy = -rmax; dy <= rmax; ++dy) {
      const int64_t yy = y + dy;
      const int64_t hw = half[dy < 0 ? -dy : dy];
      if (yy < 0 || yy >= h || hw < 0) continue;
      const int64_t x0 = std::max<int64_t>(0, x - hw), x1 = std::min<int64_t>(w - 1, x + hw);
      for (int64_t xx = x0; xx <= x1; ++xx) gone[yy * w + xx] = 1;
    }
  }
  return picked;
}

}  // namespace pyfastscan
