"""Numba CUDA kernel of the mitotic hotspot counts (DESIGN.md 4), the algorithm of
csrc/cpu/hotspot_cpu.cpp: one thread per grid row; the points that reach the row (sorted
by y, found by binary search) add +1 / -1 at the ends of their column span in the row's
difference array, then the thread scans the row. The window tests are those of
csrc/include/hotspot.h, in float64 and without contraction (Numba does not fuse a*b + c
unless fastmath is on), so the counts equal the brute-force oracle.

Runs on the CPU under NUMBA_ENABLE_CUDASIM=1 (set before numba is imported).
"""
import math

import numpy as np
import torch
from numba import cuda


@cuda.jit(device=True)
def _centre(j, step):
    return (j + 0.5) * step


@cuda.jit(device=True)
def _inside(dx, dy, circle, r2, half_w, half_h):
    if circle:
        return dy * dy + dx * dx <= r2
    return abs(dy) <= half_h and abs(dx) <= half_w


@cuda.jit(device=True)
def _lower_bound(a, n, v):
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit
def hotspot_rows_kernel(xs, ys, step, n_cols, row0, row1, circle, r2, half_w, half_h, out):
    i = row0 + cuda.grid(1)
    if i >= row1:
        return
    row = out[i - row0]
    for j in range(n_cols):
        row[j] = 0
    d = xs.shape[0]
    reach = math.sqrt(r2) if circle else half_h
    cy = _centre(i, step)
    margin = 1e-9 * (abs(cy) + reach) + 1e-9
    k = _lower_bound(ys, d, cy - reach - margin)
    while k < d and ys[k] <= cy + reach + margin:
        dy = cy - ys[k]
        reaches = dy * dy <= r2 if circle else abs(dy) <= half_h
        if reaches:
            x = xs[k]
            half = math.sqrt(max(0.0, r2 - dy * dy)) if circle else half_w
            a = int(math.ceil((x - half) / step - 0.5))
            b = int(math.floor((x + half) / step - 0.5))
            a = min(max(a, 0), n_cols)
            b = min(max(b, -1), n_cols - 1)
            while a > 0 and _inside(_centre(a - 1, step) - x, dy, circle, r2, half_w, half_h):
                a -= 1
            while a < n_cols and a <= b and not _inside(_centre(a, step) - x, dy, circle, r2, half_w, half_h):
                a += 1
            while b < n_cols - 1 and _inside(_centre(b + 1, step) - x, dy, circle, r2, half_w, half_h):
                b += 1
            while b >= a and not _inside(_centre(b, step) - x, dy, circle, r2, half_w, half_h):
                b -= 1
            if a <= b:
                row[a] += 1
                if b + 1 < n_cols:
                    row[b + 1] -= 1
        k += 1
    run = 0
    for j in range(n_cols):
        run += row[j]
        row[j] = run


def hotspot_rows_numba(xs: torch.Tensor, ys: torch.Tensor, g, row0: int, row1: int) -> torch.Tensor:
    """Rows [row0, row1) of the count map; xs, ys float64 sorted by y. Returns int32 on the CPU."""
    d_xs, d_ys = cuda.to_device(np.ascontiguousarray(xs.numpy())), cuda.to_device(np.ascontiguousarray(ys.numpy()))
    out = cuda.device_array((row1 - row0, g.n_cols), dtype=np.int32)
    threads = 64
    blocks = (row1 - row0 + threads - 1) // threads
    hotspot_rows_kernel[blocks, threads](d_xs, d_ys, g.step, g.n_cols, row0, row1, g.circle, g.r2, g.half_w,
                                         g.half_h, out)
    return torch.from_numpy(out.copy_to_host())
