"""rasterize: time grows with each polygon's bounding box, not with the image (issue 17).

    .venv/bin/pytest bench/bench_rasterize.py -o python_files="bench_*.py" --benchmark-only

1,050 polygons (circles of 24 vertices, radius 4-20 px) on a 1024 x 1024 mask, against the
literal definition (every pixel centre tested against every polygon by even-odd ray
casting, vectorised per polygon over the whole image) on the same input. Target: < 1 s.
"""
import numpy as np

from pyfastscan.io import Annotation, rasterize

SIDE, N = 1024, 1050


def _polygons(seed=0):
    g = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    out = []
    for _ in range(N):
        cx, cy, r = g.uniform(0, SIDE), g.uniform(0, SIDE), g.uniform(4, 20)
        out.append(Annotation("polygon", np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1), "tumor"))
    return out


def whole_image(polys):
    """Every pixel centre against every polygon (the cost rasterize had before: polygons x image)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    for a in polys:
        inside = np.zeros_like(mask)
        p, q = a.coords, np.roll(a.coords, -1, axis=0)
        for (x0, y0), (x1, y1) in zip(p, q):
            if y0 == y1:
                continue
            inside ^= ((y0 > yy) != (y1 > yy)) & (xx < x0 + (yy - y0) * (x1 - x0) / (y1 - y0))
        mask |= inside
    return mask


def test_rasterize_1050_polygons(benchmark):
    polys = _polygons()
    got = rasterize(polys, (SIDE, SIDE))
    ref = whole_image(polys[:50])  # the literal definition is slow: checked on the first 50 polygons
    assert np.array_equal(rasterize(polys[:50], (SIDE, SIDE)), ref)
    assert got.sum() > 0
    benchmark.group = "rasterize 1,050 polygons on 1024 x 1024"
    benchmark.pedantic(lambda: rasterize(polys, (SIDE, SIDE)), rounds=3, warmup_rounds=0)
