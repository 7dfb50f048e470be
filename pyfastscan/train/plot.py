"""The learning curve as a PNG, with Pillow only: losses on the left axis, validation F1 and
AUC on the right one (0 to 1), one point per epoch."""
import math
from typing import Dict, Sequence

from ..io.images import draw_x_labels, font, text_size, write_png

SERIES = (("train_loss", (200, 30, 30), "left"), ("val_loss", (230, 140, 40), "left"),
          ("val_f1", (30, 90, 200), "right"), ("val_auc", (40, 160, 80), "right"))


def _nice_top(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``v`` (> 0): an axis end whose fifths
    are round numbers."""
    k = math.floor(math.log10(v))
    return next(m * 10.0 ** k for m in (1, 2, 2.5, 5, 10) if m * 10.0 ** k >= v * (1 - 1e-12))


def write_learning_curve(path: str, history: Sequence[Dict[str, float]], size=(720, 480)) -> str:
    """Plot ``history`` (rows with "epoch" and the SERIES keys; missing values skipped)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 70, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    epochs = [r["epoch"] for r in history]
    emax = max(max(epochs, default=1), 1)
    losses = [r[k] for r in history for k, _, side in SERIES
              if side == "left" and isinstance(r.get(k), float) and math.isfinite(r[k])]
    lmax = _nice_top(max(losses, default=1.0) or 1.0)
    fnt = font(12)

    def px(e, v, side):
        y = v / lmax if side == "left" else v
        return left + (e - (1 if emax > 1 else 0)) / max(emax - 1, 1) * (w - left - right), \
            h - bottom - y * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        y = h - bottom - k / 5 * (h - top - bottom)
        s = f"{lmax * k / 5:g}"
        d.text((left - 8 - text_size(d, s, fnt)[0], y - 7), s, fill="black", font=fnt)
        d.text((w - right + 8, y - 7), f"{k / 5:.1f}", fill="black", font=fnt)
    draw_x_labels(d, [(px(e, 0, "right")[0], str(e)) for e in epochs], h - bottom + 6, fnt)
    for i, (key, colour, side) in enumerate(SERIES):
        pts = [px(r["epoch"], r[key], side) for r in history if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((left + 10 + i * 140, 14), f"{key} ({side})", fill=colour, font=fnt)
    d.text((w // 2 - 20, h - 22), "epoch", fill="black", font=fnt)
    return write_png(path, img)
