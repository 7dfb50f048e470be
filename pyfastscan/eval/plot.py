"""A curve as a PNG with Pillow only (no plotting library needed)."""
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from ..io.images import draw_x_labels, font, text_size, write_png


def tick_label(v: float) -> str:
    """1/8, 1/4, 1/2 for the fractions of the FROC rates, else the number."""
    f = Fraction(v).limit_denominator(64)
    if 0 < v < 1 and f.numerator == 1 and abs(float(f) - v) < 1e-12:
        return f"1/{f.denominator}"
    return f"{v:g}"


def _clip_right(pts):
    """The polyline (axis fraction, y) cut where it leaves the axis on the right (u > 1),
    the crossing point interpolated."""
    out = []
    for k, (u, y) in enumerate(pts):
        if u <= 1:
            out.append((u, y))
            continue
        if k and pts[k - 1][0] < 1:
            (u0, y0) = pts[k - 1]
            out.append((1.0, y0 + (y - y0) * (1 - u0) / (u - u0)))
        break
    return out


def _clip_left(line, x_min: float):
    """The polyline (x, y) from x_min on: the points left of it replaced by the point where
    the curve crosses x_min, interpolated linearly in x (the FROC's linear reading, so that
    a dot drawn at x_min lies on the curve). A curve wholly left of x_min keeps its last
    point, drawn at the left edge."""
    right = [p for p in line if p[0] >= x_min]
    left = [p for p in line if p[0] < x_min]
    if not left:
        return right
    (x0, y0) = left[-1]
    if not right:
        return [(x_min, y0)]
    (x1, y1) = right[0]
    return [(x_min, y0 + (y1 - y0) * (x_min - x0) / (x1 - x0))] + right


def write_curve_png(path: str, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str,
                    marks: Sequence[float] = (), size=(720, 500), log_x: bool = False,
                    points: Optional[Sequence[float]] = None) -> str:
    """Line plot of (xs, ys), y in [0, 1]; x from 0 to max(xs, marks), or with ``log_x`` a
    base-2 log axis from min(marks) to max(marks) (the curve starts where it crosses the
    axis's left edge, interpolated linearly in x); vertical grid lines and tick labels at
    ``marks`` (1/4, 1/2, ... written as fractions); ``points``, the curve's y at each mark,
    drawn as dots with their values. The curve is cut where it leaves the axis on the right.
    Tick labels never overlap: one too close to the previous one is left out. Written
    atomically."""
    from PIL import Image, ImageDraw

    w, h = size
    fnt, small = font(14), font(12)
    left, right, top, bottom = 78, 24, 44, 64
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    marks = [float(m) for m in marks]
    if log_x:
        if not marks or min(marks) <= 0:
            raise ValueError("a log x axis needs positive marks to span")
        lo, hi = np.log2(min(marks)), np.log2(max(marks))

        def fx(x):
            return (np.log2(np.maximum(x, 2.0 ** lo)) - lo) / max(hi - lo, 1e-9)
    else:
        xmax = max(float(xs.max(initial=0)), max(marks, default=0), 1e-9)

        def fx(x):
            return np.asarray(x, dtype=np.float64) / xmax

    def px(x, y):
        return left + float(fx(x)) * (w - left - right), h - bottom - float(y) * (h - top - bottom)

    for k in range(6):  # y axis: grid, ticks and labels every 0.2
        y = k / 5
        _, yy = px(marks[0] if log_x and marks else 0, y)
        d.line([(left, yy), (w - right, yy)], fill=(235, 235, 235))
        d.line([(left - 5, yy), (left, yy)], fill="black")
        s = f"{y:.1f}"
        tw, th = text_size(d, s, small)
        d.text((left - 8 - tw, yy - th / 2 - 2), s, fill="black", font=small)
    for m in marks:
        x, _ = px(m, 0)
        d.line([(x, top), (x, h - bottom)], fill=(220, 220, 220))
        d.line([(x, h - bottom), (x, h - bottom + 5)], fill="black")
    draw_x_labels(d, [(px(m, 0)[0], tick_label(m)) for m in marks], h - bottom + 8, small)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    order = np.lexsort((ys, xs))  # along x, and up at equal x
    line = [(float(x), float(y)) for x, y in zip(xs[order], ys[order])]
    if log_x:
        line = _clip_left(line, 2.0 ** lo)
    pts = _clip_right([(float(fx(x)), float(y)) for x, y in line])
    pts = [(left + u * (w - left - right), h - bottom - y * (h - top - bottom)) for u, y in pts]
    if len(pts) > 1:
        d.line(pts, fill=(200, 30, 30), width=2)
    if points is not None:
        for m, v in zip(marks, points):
            x, y = px(m, v)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 30, 30))
            s = f"{v:.2f}"
            tw, th = text_size(d, s, small)
            d.text((min(x + 6, w - right - tw - 2), max(top + 2, y - th - 8)), s, fill=(120, 0, 0), font=small)
    tw, _ = text_size(d, title, fnt)
    d.text(((w - tw) / 2, 12), title, fill="black", font=fnt)
    tw, _ = text_size(d, xlabel, fnt)
    d.text((left + (w - left - right - tw) / 2, h - 30), xlabel, fill="black", font=fnt)
    tw, th = text_size(d, ylabel, fnt)  # the y label, turned a quarter left, centred on the axis
    label = Image.new("RGB", (tw + 4, th + 8), "white")
    ImageDraw.Draw(label).text((2, 0), ylabel, fill="black", font=fnt)
    label = label.rotate(90, expand=True)
    img.paste(label, (8, int(top + (h - top - bottom - label.size[1]) / 2)))
    return write_png(path, img)
