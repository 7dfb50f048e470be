"""Generic image files and figure parts, each file written atomically (io/files.py):

    write_pyramid_tif  tiled pyramidal TIFF, every level a page of the main IFD chain (where
                       OpenSlide looks), the resolution of each level in its tags
    write_png          an RGB or RGBA uint8 array as PNG
    colour_map         probability -> RGB (blue, cyan, yellow, red)
    font, draw_colour_bar, draw_scale_bar, draw_x_labels, nice_length: the parts of a figure

Nothing here knows about scans or slides: the jobs (pipeline/outputs.py, mitosis/outputs.py,
eval/plot.py) compose these.
"""
from typing import Optional, Sequence, Tuple

import numpy as np

from .files import atomic_write


def halve(a: np.ndarray, band: int = 512) -> np.ndarray:
    """2x2 box downsample of an image (H, W) or (H, W, C): uint8 rounding half up, float
    averaged in its dtype; an axis of length 1 stays 1. Computed ``band`` rows (even) at a
    time, so its temporaries are a band's, not several copies of the image (a 10k x 10k
    heat map's level 1 took 380 MB of them at once)."""
    if a.shape[0] < 2 or a.shape[0] <= band:
        return _halve(a)
    band += band % 2
    even = a.shape[0] // 2 * 2
    out = None
    for r in range(0, even, band):  # bands of whole row pairs: each output row is the same sum
        part = _halve(a[r:min(r + band, even)])
        if out is None:
            out = np.empty((even // 2,) + part.shape[1:], dtype=a.dtype)
        out[r // 2:r // 2 + len(part)] = part
    return out


def _halve(a: np.ndarray) -> np.ndarray:
    floating = np.issubdtype(a.dtype, np.floating)
    b = a.astype(a.dtype if floating else np.uint16)
    for axis in (0, 1):
        n = b.shape[axis]
        if n < 2:
            b = b * 2
            continue
        even = n // 2 * 2
        b = np.take(b, range(0, even, 2), axis) + np.take(b, range(1, even, 2), axis)
    return (b / 4).astype(a.dtype) if floating else ((b + 2) // 4).astype(np.uint8)


def write_pyramid_tif(path: str, image: np.ndarray, mpp: float, *, levels: Optional[int] = None,
                      compression: str = "zlib", description: Optional[str] = None) -> str:
    """Tiled (256 px) pyramidal TIFF, each level a page of the main IFD chain (where
    OpenSlide looks), with the resolution of each level in its tags (pixels per cm, so
    OpenSlide's ``openslide.mpp-x`` is ``mpp * 2**level``). ``image`` is uint8 or float32
    (H, W) or RGB (H, W, 3) at ``mpp`` um/px. Without ``levels``, halves until the level
    fits one tile. Level k is ``halve`` applied k times (2x2 box means)."""
    import tifffile

    pyramid = [image]
    while (len(pyramid) < levels) if levels is not None else max(pyramid[-1].shape[:2]) > 256:
        pyramid.append(halve(pyramid[-1]))
    photometric = "rgb" if image.ndim == 3 else "minisblack"

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for i, lv in enumerate(pyramid):
                res = 1e4 / (mpp * 2 ** i)  # pixels per centimetre
                tif.write(lv, tile=(256, 256), compression=compression, photometric=photometric,
                          resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
                          description=description if i == 0 else None, metadata=None)

    return atomic_write(path, write)


def write_png(path: str, image) -> str:
    """An (H, W, 3) / (H, W, 4) uint8 array or a PIL image as PNG, atomically."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def colour_map(values: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB of values in [0, 1] (clipped): 0 blue, 1/3 cyan, 2/3 yellow, 1 red,
    linear in between."""
    h = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)
    pos = h * 3
    i = np.minimum(pos.astype(int), 2)
    f = pos - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)


def font(size: int = 12):
    """Pillow's bundled scalable font at ``size`` px (Pillow >= 10.1), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def text_size(draw, text: str, fnt) -> Tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    return x1 - x0, y1 - y0


def draw_x_labels(draw, labels: Sequence[Tuple[float, str]], y: float, fnt, gap: float = 6) -> None:
    """Labels (x, text) centred on their x along a horizontal axis, top at ``y``, left to
    right; one that would come within ``gap`` px of the previous one drawn is left out."""
    last_right = -1e9
    for x, s in labels:
        tw = text_size(draw, s, fnt)[0]
        if x - tw / 2 > last_right + gap:
            draw.text((x - tw / 2, y), s, fill="black", font=fnt)
            last_right = x + tw / 2


def draw_colour_bar(draw, box: Tuple[int, int, int, int], ticks: Sequence[float], label: str,
                    transparent_below: Optional[float] = None, fnt=None) -> None:
    """A horizontal colour bar of :func:`colour_map` from 0 to 1 in ``box`` (x0, y0, x1, y1),
    tick marks and labels below it at ``ticks``, ``label`` above it. Values below
    ``transparent_below`` (drawn as a grey-and-white checkerboard) are the ones a figure
    leaves uncoloured."""
    fnt = fnt or font(12)
    x0, y0, x1, y1 = box
    width = x1 - x0
    for k in range(width):
        v = (k + 0.5) / width
        if transparent_below is not None and v < transparent_below:
            cell = ((k // 4) + ((y0 // 4) & 1)) & 1
            for yy in range(y0, y1, 4):
                shade = (200, 200, 200) if (cell + (yy - y0) // 4) & 1 else (255, 255, 255)
                draw.line([(x0 + k, yy), (x0 + k, min(y1, yy + 4) - 1)], fill=shade)
        else:
            draw.line([(x0 + k, y0), (x0 + k, y1 - 1)], fill=tuple(int(c) for c in colour_map(np.array(v))))
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for t in ticks:
        x = x0 + t * width
        draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
        s = f"{t:g}"
        tw, _ = text_size(draw, s, fnt)
        draw.text((x - tw / 2, y1 + 5), s, fill=(0, 0, 0), font=fnt)
    _, th = text_size(draw, label, fnt)
    draw.text((x0, y0 - th - 6), label, fill=(0, 0, 0), font=fnt)


def nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``limit`` (> 0)."""
    if not limit > 0:
        raise ValueError(f"limit must be positive, got {limit}")
    k = np.floor(np.log10(limit))
    for m in (5, 2, 1):
        if m * 10 ** k <= limit * (1 + 1e-12):
            return float(m * 10 ** k)
    return float(10 ** k)


def draw_scale_bar(draw, xy: Tuple[int, int], px_per_mm: float, max_px: int, fnt=None) -> float:
    """A black scale bar starting at ``xy`` (left end, top), as long as the largest 1-2-5
    length in mm that fits ``max_px`` pixels, labelled with that length. Returns the
    length in mm."""
    fnt = fnt or font(12)
    mm = nice_length(max_px / px_per_mm)
    n = mm * px_per_mm
    x, y = xy
    draw.rectangle([x, y, x + n, y + 5], fill=(0, 0, 0))
    draw.line([(x, y - 3), (x, y + 8)], fill=(0, 0, 0))
    draw.line([(x + n, y - 3), (x + n, y + 8)], fill=(0, 0, 0))
    s = f"{mm:g} mm"
    tw, _ = text_size(draw, s, fnt)
    draw.text((x + n / 2 - tw / 2, y + 10), s, fill=(0, 0, 0), font=fnt)
    return mm
