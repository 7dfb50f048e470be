"""Numba CUDA kernel of the mitotic hotspot counts (DESIGN.md 4), the algorithm of
csrc/cpu/hotspot_cpu.cpp: one thread per grid row; the points that reach the row (sorted
by y, found by binary search) add +1 / -1 at the ends of their column span in the row's
difference array, then the thread scans the row. The window tests are those of
csrc/include/hotspot.h, in float64 with every product and sum rounded on its own, so the
counts equal the brute-force oracle (numpy's dy*dy + dx*dx).

On a GPU, NVVM contracts ``a*b + c`` into one ``fma.rn`` (only fastmath changes that in
Numba), which moves window boundaries by an ulp; the products and sums of the window tests
therefore go through libdevice's ``dmul_rn`` / ``dadd_rn``, which are never contracted.
The simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported) has no libdevice and
rounds every Python operator on its own anyway: there the plain operators are used.
tests/test_gpu_compile.py compiles this kernel for cc 8.0 and checks its PTX has no fma.

The two-argument builtins ``max(a, b)`` / ``min(a, b)`` do not compile for CUDA since
numba 0.66 (numba issue 10753): conditional expressions instead.
"""
import math

import numpy as np
import torch
from numba import config, cuda

if config.ENABLE_CUDASIM:
    @cuda.jit(device=True)
    def _mul(a, b):
        return a * b

    @cuda.jit(device=True)
    def _add(a, b):
        return a + b
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.dmul_rn(a, b)

    @cuda.jit(device=True)
    def _add(a, b):
        return libdevice.dadd_rn(a, b)


@cuda.jit(device=True)
def _centre(j, step):
    return _mul(j + 0.5, step)


@cuda.jit(device=True)
def _inside(dx, dy, circle, r2, half_w, half_h):
    if circle:
        return _add(_mul(dy, dy), _mul(dx, dx)) <= r2
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
    margin = _add(_mul(1e-9, abs(cy) + reach), 1e-9)  # separate roundings: no fma anywhere in the kernel
    k = _lower_bound(ys, d, cy - reach - margin)
    while k < d and ys[k] <= cy + reach + margin:
        dy = cy - ys[k]
        dy2 = _mul(dy, dy)
        reaches = dy2 <= r2 if circle else abs(dy) <= half_h
        if reaches:
            x = xs[k]
            rest = r2 - dy2
            half = (math.sqrt(rest) if rest > 0.0 else 0.0) if circle else half_w
            # a first guess of the column span; the loops below make it exact
            a = int(math.ceil((x - half) / step - 0.5))
            b = int(math.floor((x + half) / step - 0.5))
            a = 0 if a < 0 else (n_cols if a > n_cols else a)
            b = -1 if b < -1 else (n_cols - 1 if b > n_cols - 1 else b)
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


THREADS = 64  # threads per block; one thread per grid row


def hotspot_rows_signature():
    """The argument types hotspot_rows_numba launches the kernel with (what Numba's JIT
    infers from its arguments), for compiling it ahead of time (tests/test_gpu_compile.py)."""
    from numba import types

    f64, i64 = types.float64, types.int64
    return (types.float64[::1], types.float64[::1], f64, i64, i64, i64, types.boolean, f64, f64, f64,
            types.int32[:, ::1])


def hotspot_rows_numba(xs: torch.Tensor, ys: torch.Tensor, g, row0: int, row1: int) -> torch.Tensor:
    """Rows [row0, row1) of the count map; xs, ys float64 sorted by y. Returns int32 on the CPU."""
    d_xs, d_ys = cuda.to_device(np.ascontiguousarray(xs.numpy())), cuda.to_device(np.ascontiguousarray(ys.numpy()))
    out = cuda.device_array((row1 - row0, g.n_cols), dtype=np.int32)
    blocks = (row1 - row0 + THREADS - 1) // THREADS
    hotspot_rows_kernel[blocks, THREADS](d_xs, d_ys, float(g.step), int(g.n_cols), int(row0), int(row1),
                                         bool(g.circle), float(g.r2), float(g.half_w), float(g.half_h), out)
    return torch.from_numpy(out.copy_to_host())
