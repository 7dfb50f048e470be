"""Annotations in level-0 pixels, their rasterisation, and heat-map contours.

An :class:`Annotation` is a polygon (exterior ring plus optional holes) or a set of
points, with a group (ASAP ``PartOfGroup``, QuPath classification) and properties. ASAP
XML (asap.py), GeoJSON (geojson.py) and SlideRunner (sliderunner.py) read into and write
from this one type.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import InvalidArgumentError
from ..validate import POSITIVE, check

# Camelyon16 ground truth: tumour polygons in groups "_0" and "_1" (and "Tumor"), and
# "_2" (also "Exclusion") for normal tissue inside them, removed from the mask.
EXCLUSION_GROUPS = ("_2", "Exclusion", "exclusion")


@dataclass
class Annotation:
    """``coords`` is (N, 2) float64 (x, y) in level-0 pixels: the exterior ring of a
    polygon (not repeated at the end), or the points of a point annotation."""

    kind: str  # "polygon" or "points"
    coords: np.ndarray
    group: str = ""
    name: str = ""
    holes: List[np.ndarray] = field(default_factory=list)
    properties: Dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("polygon", "points"):
            raise InvalidArgumentError(f"annotation kind must be 'polygon' or 'points', got {self.kind!r}")
        self.coords = _ring(self.coords)
        self.holes = [_ring(h) for h in self.holes]


def _ring(c) -> np.ndarray:
    a = np.asarray(c, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(a).all():
        raise InvalidArgumentError("annotation coordinates must be finite")
    return a


def _crossings(rings: Sequence[np.ndarray], shape: Tuple[int, int], downsample: float):
    """Even-odd inside test over the rings' bounding box: (r0, c0, box) with box a bool
    array, True where a pixel centre is inside an odd number of the rings; every pixel
    outside the box is outside them all. A pixel (r, c) has its centre at
    ((c + 0.5) * d, (r + 0.5) * d). Time and memory grow with the box, not the image."""
    h, w = shape
    rings = [r / downsample - 0.5 for r in rings if len(r) >= 3]  # pixel-centre units: centre of (r, c) is (c, r)
    if not rings:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    allp = np.concatenate(rings)
    r0, r1 = (int(np.clip(np.ceil(v), 0, h)) for v in (allp[:, 1].min(), allp[:, 1].max()))
    c0, c1 = (int(np.clip(np.ceil(v), 0, w)) for v in (allp[:, 0].min(), allp[:, 0].max()))
    # every edge of every ring at once: edge k crosses the pixel-centre rows [ceil(lo), ceil(hi))
    b = np.concatenate([np.roll(p, -1, axis=0) for p in rings])
    crossing = allp[:, 1] != b[:, 1]  # horizontal edges cross no row
    a, b = allp[crossing], b[crossing]
    (x0, y0), (x1, y1) = a.T, b.T
    first = np.clip(np.ceil(np.minimum(y0, y1)), r0, r1).astype(np.int64)
    n = np.clip(np.ceil(np.maximum(y0, y1)), r0, r1).astype(np.int64) - first
    edge = np.repeat(np.arange(len(n)), n)
    rows = first[edge] + np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n)
    xs = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    cols = np.clip(np.ceil(xs), c0, c1).astype(np.int64)  # first centre at or right of the edge
    width = c1 - c0 + 1  # a toggle at column c1 changes nothing inside the box
    toggles = np.bincount((rows - r0) * width + (cols - c0), minlength=(r1 - r0) * width).reshape(r1 - r0, width)
    return r0, c0, (np.cumsum(toggles, axis=1)[:, :c1 - c0] & 1).astype(bool)


def rasterize(annotations: Sequence[Annotation], shape: Tuple[int, int], downsample: float = 1.0,
              exclude_groups: Sequence[str] = EXCLUSION_GROUPS, groups: Sequence[str] = None) -> np.ndarray:
    """Boolean mask (H, W) at ``downsample`` level-0 pixels per mask pixel: a pixel is set
    when its centre lies inside a polygon (even-odd rule with its holes) of an included
    group and inside no polygon of an exclusion group. ``groups`` restricts the included
    groups (default: every group not excluded). Point annotations are ignored."""
    downsample = check("downsample", downsample, POSITIVE)
    polys = [a for a in annotations if a.kind == "polygon"]
    inc = [a for a in polys if a.group not in exclude_groups and (groups is None or a.group in groups)]
    exc = [a for a in polys if a.group in exclude_groups]
    mask = np.zeros(shape, dtype=bool)
    for excluded, group in ((False, inc), (True, exc)):  # inclusions first, then exclusions remove
        for a in group:
            r0, c0, box = _crossings([a.coords, *a.holes], shape, downsample)
            view = mask[r0:r0 + box.shape[0], c0:c0 + box.shape[1]]
            if excluded:
                view &= ~box
            else:
                view |= box
    return mask


def contours(mask: np.ndarray, stride_px: float = 1.0, origin_px: Tuple[float, float] = (0.5, 0.5),
             group: str = "tumor", hole_group: str = "_2") -> List[Annotation]:
    """Outlines of a boolean map along its cell edges, as polygons in level-0 pixels: the
    outer boundary of each 4-connected region in ``group``, each hole in ``hole_group``.
    Cell (i, j) is centred at origin + (j, i) * stride. ``rasterize`` on the same grid gives
    the mask back exactly, except islands inside holes (the hole, drawn after, removes them)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1]
    edges = {}
    # directed cell edges on the region's boundary, inside on the left (y grows downwards),
    # as (start corner) -> [end corners]; corner (x, y) is the top-left of cell (y, x)
    for outside, start, end in ((m[:-2, 1:-1], (1, 0), (0, 0)),   # top edge, going left
                                (m[2:, 1:-1], (0, 1), (1, 1)),    # bottom edge, going right
                                (m[1:-1, :-2], (0, 0), (0, 1)),   # left edge, going down
                                (m[1:-1, 2:], (1, 1), (1, 0))):   # right edge, going up
        ys, xs = np.nonzero(inner & ~outside)
        for i, j in zip(ys.tolist(), xs.tolist()):
            edges.setdefault((j + start[0], i + start[1]), []).append((j + end[0], i + end[1]))
    out = []
    while edges:
        start = next(iter(edges))
        loop, cur, prev_dir = [start], start, None
        while True:
            nexts = edges[cur]
            if len(nexts) > 1 and prev_dir is not None:  # a pinch point: keep the region 4-connected
                # turn so the inside stays on the left: prefer the left turn
                left = (prev_dir[1], -prev_dir[0])
                nxt = next((n for n in nexts if (n[0] - cur[0], n[1] - cur[1]) == left), nexts[0])
            else:
                nxt = nexts[0]
            nexts.remove(nxt)
            if not nexts:
                del edges[cur]
            prev_dir = (nxt[0] - cur[0], nxt[1] - cur[1])
            cur = nxt
            if cur == start:
                break
            loop.append(cur)
        pts = np.array(loop, dtype=np.float64)
        before, after = pts - np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0) - pts
        pts = pts[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0]  # corners only
        area2 = float(np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1]))
        xy = np.column_stack([origin_px[0] + (pts[:, 0] - 0.5) * stride_px,
                              origin_px[1] + (pts[:, 1] - 0.5) * stride_px])
        # inside on the left with y down: outer rings run counter-clockwise on screen (negative area)
        out.append(Annotation("polygon", xy, hole_group if area2 > 0 else group,
                              name=f"contour {len(out)}"))
    return out


def contour_polygons(mask: np.ndarray, stride_px: float = 1.0, origin_px: Tuple[float, float] = (0.5, 0.5),
                     group: str = "tumor", values: np.ndarray = None) -> List[Annotation]:
    """Outlines of a boolean map as one polygon with holes per 4-connected region (the
    GeoJSON / QuPath form; :func:`contours` gives ASAP's form, holes as polygons of an
    exclusion group). Same grid and edges as :func:`contours`; ``rasterize`` on that grid
    gives the mask back exactly, islands inside holes included (they are regions of their
    own). With ``values`` (the map, same shape), each polygon's properties carry
    ``measurements: {"max probability": the maximum of values over the region}``."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    # labelled within the mask's bounding box only: the labels are int32, 4 bytes a cell
    # (400 MB for an 80k px slide's whole map, where the regions took a few thousand cells)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if not rows.size:
        return []
    br, bc = rows[0], cols[0]
    box = (slice(br, rows[-1] + 1), slice(bc, cols[-1] + 1))
    labels, n = ndimage.label(m[box])  # 4-connected, as contours traces; numbered in the same raster order
    peaks = ndimage.maximum(np.asarray(values)[box], labels, np.arange(1, n + 1)) if values is not None and n else None
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        origin = (origin_px[0] + (bc + sl[1].start) * stride_px, origin_px[1] + (br + sl[0].start) * stride_px)
        rings = contours(labels[sl] == k + 1, stride_px, origin, group="outer", hole_group="hole")
        outers = [a.coords for a in rings if a.group == "outer"]
        holes = [a.coords for a in rings if a.group == "hole"]
        props = {"measurements": {"max probability": float(peaks[k])}} if peaks is not None else {}
        if len(outers) == 1:
            out.append(Annotation("polygon", outers[0], group, f"region {k}", holes, dict(props)))
        else:  # not expected for a 4-connected region; keep ASAP's form rather than guess
            out.extend(Annotation("polygon", o, group, f"region {k}", properties=dict(props)) for o in outers)
            out.extend(Annotation("polygon", h, EXCLUSION_GROUPS[0], f"region {k} hole") for h in holes)
    return out


def holes_as_exclusions(polygons: Sequence[Annotation], hole_group: str = EXCLUSION_GROUPS[0]) -> List[Annotation]:
    """Polygons with holes in the form ASAP XML can hold: each hole becomes a polygon of
    ``hole_group`` (an exclusion group, removed by :func:`rasterize`), after its outer
    polygon. The mask rasterised from it is the same, except islands inside holes (the
    exclusion, drawn after, removes them), as with :func:`contours`."""
    out = []
    for a in polygons:
        out.append(Annotation(a.kind, a.coords, a.group, a.name, properties=dict(a.properties)))
        out.extend(Annotation("polygon", h, hole_group, f"{a.name} hole {k}".strip()) for k, h in enumerate(a.holes))
    return out
