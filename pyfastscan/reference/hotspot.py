"""Reference mitotic hotspot counts: DESIGN.md 4, by brute force (every centre against
every point). Small cases only: it is the oracle the fast backends must equal exactly.

The grid and the window tests are written out once here and the C++ kernel evaluates the
same float64 expressions in the same order (csrc/include/hotspot.h), so decisions on the
boundary agree bit for bit:

    centre j (per axis)   c_j = (j + 0.5) * step,  j = 0 .. n - 1 with c_{n-1} < size
    circle                (c_x - p_x)^2 + (c_y - p_y)^2 <= r2         (r2 = area / pi)
    rect                  |c_x - p_x| <= half_w  and  |c_y - p_y| <= half_h
"""
import math

import torch


def grid_len(size: float, step: float) -> int:
    """Number of centres (j + 0.5) * step that are < size."""
    n = max(0, math.ceil(size / step - 0.5))
    while n > 0 and (n - 1 + 0.5) * step >= size:
        n -= 1
    while (n + 0.5) * step < size:
        n += 1
    return n


def centres(n: int, step: float) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) * step


def hotspot_counts_ref(points: torch.Tensor, n_rows: int, n_cols: int, step: float, window: str,
                       r2: float = 0.0, half_w: float = 0.0, half_h: float = 0.0) -> torch.Tensor:
    """Counts (n_rows, n_cols) int32: detections inside the window around each centre.

    Args:
        points: (D, 2) float64 (x, y) in level-0 pixels.
        step: grid step in level-0 pixels; window "circle" (r2, squared radius in px^2) or
            "rect" (half_w, half_h in px).
    """
    cy, cx = centres(n_rows, step), centres(n_cols, step)
    counts = torch.zeros(n_rows, n_cols, dtype=torch.int32)
    for px, py in points.tolist():
        dx, dy = cx - px, cy - py
        if window == "circle":
            inside = (dy * dy)[:, None] + (dx * dx)[None, :] <= r2
        else:
            inside = (dy.abs() <= half_h)[:, None] & (dx.abs() <= half_w)[None, :]
        counts += inside.to(torch.int32)
    return counts
