"""A curve as a PNG with Pillow only (no plotting library needed)."""
from typing import Sequence

import numpy as np

from ..io.files import atomic_write


def write_curve_png(path: str, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str,
                    marks: Sequence[float] = (), size=(640, 480)) -> str:
    """Line plot of (xs, ys), y in [0, 1], x from 0 to max(xs, marks); vertical ticks at
    ``marks``; written atomically."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    xmax = max(float(xs.max(initial=0)), max(marks, default=0), 1e-9)

    def px(x, y):
        return left + x / xmax * (w - left - right), h - bottom - y * (h - top - bottom)

    for k in range(6):
        y = k / 5
        d.line([px(0, y), (px(0, y)[0] - 5, px(0, y)[1])], fill="black")
        d.text((5, px(0, y)[1] - 6), f"{y:.1f}", fill="black")
    for m in marks:
        d.line([px(m, 0), px(m, 1)], fill=(220, 220, 220))
        d.text((px(m, 0)[0] - 8, h - bottom + 6), f"{m:g}", fill="black")
    d.rectangle([px(0, 1), px(xmax, 0)], outline="black")
    order = np.lexsort((ys, xs))  # along x, and up at equal x
    pts = [px(x, y) for x, y in zip(xs[order], ys[order])]
    if len(pts) > 1:
        d.line(pts, fill=(200, 30, 30), width=2)
    d.text((left, 12), title, fill="black")
    d.text((left + 150, h - 22), xlabel, fill="black")
    d.text((5, 22), ylabel, fill="black")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
