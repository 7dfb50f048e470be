"""Mitotic hotspot counts (DESIGN.md 4): moving-window counts of detections, their
maximum, percentile and the mitotic grade.

Follow one call: ``hotspot_counts`` validates (``_check_*``) and turns micrometres into
level-0 pixels (``_geometry``), then ``backends.dispatch`` picks a backend:

    torch   pyfastscan/reference/hotspot.py   hotspot_counts_ref   (brute force, the oracle)
    cpu     csrc/cpu/hotspot_cpu.cpp          hotspot_rows_cpu     (per-row span differences)
    numba   kernels/hotspot_numba.py          hotspot_rows_numba   (Numba CUDA, same algorithm)

and tests/test_hotspot.py proves the counts integer-equal to the oracle.

Grid: window centres at ((j + 0.5) * step, (i + 0.5) * step) level-0 pixels, for every
centre inside the slide. Windows that leave the slide count only what lies inside.
Circle: a detection counts when its squared distance to the centre is <= r^2, area = pi r^2.
Rect: axis-aligned, width : height = aspect, closed edges.
"""
import math
import sys
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from .. import _native
from ..backends import Impl, dispatch
from ..errors import InvalidArgumentError
from ..reference.hotspot import grid_len, hotspot_counts_ref
from ..masks import TissueMask
from ..validate import POSITIVE, check

DEFAULT_AREA_MM2 = {"circle": 2.0, "rect": 2.37}  # Tellez et al.; 10 HPF of the canine dataset
_BAND_BYTES = 64 << 20  # count rows computed at a time by hotspot_stats


class CountMap(NamedTuple):
    """Counts at the grid of window centres.

    counts: (rows, cols) int32 tensor; counts[i, j] belongs to the centre at
    origin_xy + (j, i) * step_px, in level-0 pixels.
    """

    counts: torch.Tensor
    origin_xy: Tuple[float, float]
    step_px: float
    window: str
    area_mm2: float

    def centre_xy(self, row: int, col: int) -> Tuple[float, float]:
        return (self.origin_xy[0] + col * self.step_px, self.origin_xy[1] + row * self.step_px)


class HotspotStats(NamedTuple):
    """Summary of the count map over the included centres (tissue, or non-zero counts).

    percentile_count follows numpy.percentile's default ("linear") rule over the included
    centres; max_center_xy is the first maximum in row-major order (None when no centre is
    included). histogram[c] is the number of included centres with count c.
    """

    max_count: int
    max_center_xy: Optional[Tuple[float, float]]
    percentile_count: float
    percentile: float
    n_positions: int
    n_detections: int
    window: str
    area_mm2: float
    step_um: float
    histogram: np.ndarray


class _Geometry(NamedTuple):
    n_rows: int
    n_cols: int
    step: float  # px
    circle: bool
    r2: float
    half_w: float
    half_h: float
    area_mm2: float


# ----------------------------------------------------------------------------- validation


def _positive(name, v) -> float:
    return check(name, v, POSITIVE)


def _geometry(slide_size, mpp, window, area_mm2, aspect, step_um) -> _Geometry:
    if window not in DEFAULT_AREA_MM2:
        raise InvalidArgumentError(f"window must be 'circle' or 'rect', got {window!r}")
    try:
        w, h = (int(v) for v in slide_size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"slide_size must be (width, height) in level-0 pixels, got {slide_size!r}") from None
    if w <= 0 or h <= 0:
        raise InvalidArgumentError(f"slide_size must be positive, got {slide_size!r}")
    mpp = _positive("mpp", mpp)
    area = _positive("area_mm2", DEFAULT_AREA_MM2[window] if area_mm2 is None else area_mm2)
    step = _positive("step_um", step_um) / mpp
    area_px = area * 1e6 / (mpp * mpp)
    if window == "circle":
        return _Geometry(grid_len(h, step), grid_len(w, step), step, True, area_px / math.pi, 0.0, 0.0, area)
    try:
        ax, ay = (_positive("aspect", float(v)) for v in aspect)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"aspect must be (width, height), got {aspect!r}") from None
    half_w, half_h = math.sqrt(area_px * ax / ay) / 2, math.sqrt(area_px * ay / ax) / 2
    return _Geometry(grid_len(h, step), grid_len(w, step), step, False, 0.0, half_w, half_h, area)


def _foreign(points_xy) -> bool:
    """A DLPack producer that is neither torch nor numpy (CuPy, ...)."""
    return hasattr(points_xy, "__dlpack__") and not isinstance(points_xy, (torch.Tensor, np.ndarray))


def _array_module(points_xy):
    """The array library (e.g. cupy) of a foreign DLPack producer, so results can be handed
    back in its own type; None otherwise."""
    if not _foreign(points_xy):
        return None
    mod = sys.modules.get(type(points_xy).__module__.split(".")[0])
    return mod if hasattr(mod, "asarray") else None


def _check_points(points_xy, slide_size) -> torch.Tensor:
    """(D, 2) float64 CPU tensor of (x, y), every point finite and on the slide."""
    if _foreign(points_xy):
        points_xy = torch.from_dlpack(points_xy)  # CuPy and other DLPack producers
    try:
        p = torch.as_tensor(points_xy, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(f"points_xy must be an (D, 2) array of (x, y), got {type(points_xy).__name__}") \
            from None
    if p.numel() == 0:
        return p.reshape(0, 2)
    if p.dim() != 2 or p.shape[1] != 2:
        raise InvalidArgumentError(f"points_xy must have shape (D, 2), got {tuple(p.shape)}")
    bad = ~torch.isfinite(p).all(dim=1)
    if bad.any():
        raise InvalidArgumentError(f"{int(bad.sum())} points have NaN or infinite coordinates, first at index "
                                   f"{int(bad.nonzero()[0])}")
    w, h = slide_size
    out = (p[:, 0] < 0) | (p[:, 0] >= w) | (p[:, 1] < 0) | (p[:, 1] >= h)
    if out.any():
        i = int(out.nonzero()[0])
        raise InvalidArgumentError(f"{int(out.sum())} points lie outside the slide (0 <= x < {w}, 0 <= y < {h}), "
                                   f"first: index {i}, {tuple(p[i].tolist())}")
    return p


# ----------------------------------------------------------------------------- public API


def hotspot_counts(points_xy, *, slide_size, mpp: float, window: str = "circle", area_mm2: Optional[float] = None,
                   aspect=(4, 3), step_um: float = 8.0, backend: str = "auto") -> CountMap:
    """Number of detections inside the window around every grid centre (DESIGN.md 4).

    Args:
        points_xy: (D, 2) detections (x, y) in level-0 pixels: a tensor, numpy array,
            sequence or any DLPack producer (CuPy).
        slide_size: (width, height) of level 0 in pixels. mpp: micrometres per pixel.
        window: "circle" (default area 2 mm^2, Tellez) or "rect" (default 2.37 mm^2 = 10 HPF,
            width : height = aspect = 4 : 3).
        step_um: grid step in micrometres.
        backend: "auto", "torch" (brute force), "cpu" or "numba" (Numba CUDA; its simulator
            under NUMBA_ENABLE_CUDASIM=1).
    Returns:
        CountMap with int32 counts (rows, cols): a CPU torch tensor, or, when the points
        came from another DLPack library (CuPy), an array of that library (its
        ``asarray`` of the counts).

    Example:
        >>> cm = hotspot_counts([[500.0, 500.0]], slide_size=(1000, 1000), mpp=0.25, step_um=25)
        >>> cm.counts.shape, int(cm.counts.max())
        (torch.Size([10, 10]), 1)
    """
    g = _geometry(slide_size, mpp, window, area_mm2, aspect, step_um)
    p = _check_points(points_xy, tuple(int(v) for v in slide_size))
    counts = _counts_rows(*_sorted_by_y(p), g, 0, g.n_rows, backend)
    mod = _array_module(points_xy)
    if mod is not None:
        counts = mod.asarray(counts.numpy())
    return CountMap(counts, (g.step / 2, g.step / 2), g.step, window, g.area_mm2)


def _sorted_by_y(p: torch.Tensor):
    """(xs, ys) contiguous float64, sorted by y: the kernels binary-search ys per row."""
    order = torch.argsort(p[:, 1], stable=True)
    return p[order, 0].contiguous(), p[order, 1].contiguous()


def _counts_rows(xs: torch.Tensor, ys: torch.Tensor, g: _Geometry, row0: int, row1: int,
                 backend: str) -> torch.Tensor:
    if xs.shape[0] == 0 or row1 <= row0 or g.n_cols == 0:
        return torch.zeros(max(0, row1 - row0), g.n_cols, dtype=torch.int32)
    return dispatch("hotspot_counts", backend, _IMPLS, torch.device("cpu"), xs, ys, g, row0, row1)


def _percentile_from_histogram(hist: np.ndarray, q: float) -> float:
    """numpy.percentile(values, q) ("linear": v[floor(t)] + (v[ceil(t)] - v[floor(t)]) * frac,
    t = q/100 * (n - 1) over the sorted values) from their histogram."""
    n = int(hist.sum())
    if n == 0:
        return 0.0
    t = q / 100 * (n - 1)
    lo, hi = math.floor(t), math.ceil(t)
    cum = np.cumsum(hist)
    v_lo, v_hi = int(np.searchsorted(cum, lo, side="right")), int(np.searchsorted(cum, hi, side="right"))
    return float(v_lo + (v_hi - v_lo) * (t - lo))


def hotspot_stats(points_xy, *, slide_size, mpp: float, window: str = "circle", area_mm2: Optional[float] = None,
                  aspect=(4, 3), step_um: float = 8.0, tissue_mask=None, mask_downsample: Optional[float] = None,
                  percentile: float = 95, exclude: str = "auto", backend: str = "auto",
                  progress=None) -> HotspotStats:
    """Maximum and percentile of the hotspot counts, in bounded memory.

    The count map is computed in bands of rows (about 64 MiB each) and reduced to a
    histogram of the integer counts as it goes, so the full map never exists: a 2 um step
    over a 25 x 50 mm slide (300 million centres) needs well under 1 GB.

    Args:
        points_xy, slide_size, mpp, window, area_mm2, aspect, step_um, backend: as
            :func:`hotspot_counts`.
        tissue_mask: optional boolean image of the slide at any downsample; only centres on
            True pixels are included. Without it, centres with count 0 are excluded.
        mask_downsample: level-0 pixels per mask pixel (default: slide width / mask width).
        percentile: in [0, 100]; numpy's "linear" rule.
        exclude: which centres besides non-tissue ones are left out: "auto" (zero counts
            when there is no tissue_mask, nothing more with one), "zero" (zero counts
            always) or "none" (every centre, or every tissue centre).
        progress: optional callable(rows_done, rows_total).
    Returns:
        HotspotStats.
    """
    if exclude not in ("auto", "zero", "none"):
        raise InvalidArgumentError(f"exclude must be 'auto', 'zero' or 'none', got {exclude!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise InvalidArgumentError(f"percentile must be in [0, 100], got {percentile!r}")
    g = _geometry(slide_size, mpp, window, area_mm2, aspect, step_um)
    p = _check_points(points_xy, tuple(int(v) for v in slide_size))
    tissue = None
    if tissue_mask is not None:
        mask = np.asarray(tissue_mask.cpu() if isinstance(tissue_mask, torch.Tensor) else tissue_mask)
        if mask.ndim != 2 or mask.dtype != np.bool_:
            raise InvalidArgumentError(f"tissue_mask must be a 2-D boolean image, got {mask.dtype} {mask.shape}")
        ds = _positive("mask_downsample", mask_downsample if mask_downsample is not None
                       else int(slide_size[0]) / mask.shape[1])
        tissue = TissueMask(mask, ds)
    hist = np.zeros(p.shape[0] + 1, dtype=np.int64)
    best, best_at = -1, None
    band = max(1, _BAND_BYTES // max(1, 4 * g.n_cols))
    xs, ys = _sorted_by_y(p)
    for r0 in range(0, g.n_rows, band):
        r1 = min(g.n_rows, r0 + band)
        counts = _counts_rows(xs, ys, g, r0, r1, backend).numpy()
        included = np.ones(counts.shape, dtype=bool) if tissue is None else \
            tissue.on_grid((np.arange(r0, r1) + 0.5) * g.step, (np.arange(g.n_cols) + 0.5) * g.step)
        if exclude == "zero" or (exclude == "auto" and tissue is None):
            included &= counts > 0
        vals = counts[included]
        if vals.size:
            hist += np.bincount(vals, minlength=hist.size)[:hist.size]
            m = int(vals.max())
            if m > best:
                flat = np.flatnonzero(included & (counts == m))[0]
                i, j = divmod(int(flat), g.n_cols)
                best, best_at = m, ((j + 0.5) * g.step, (r0 + i + 0.5) * g.step)
        if progress is not None:
            progress(r1, g.n_rows)
    return HotspotStats(max(best, 0), best_at, _percentile_from_histogram(hist, percentile), float(percentile),
                        int(hist.sum()), int(p.shape[0]), window, g.area_mm2, float(step_um),
                        np.trim_zeros(hist, "b") if hist.any() else hist[:1])


def mitotic_grade(count: float, theta1: float = 6, theta2: float = 20) -> int:
    """Mitotic score from a hotspot count: 1 if count <= theta1, 2 if <= theta2, else 3
    (Tellez et al.: theta1 = 6, theta2 = 20 for a 2 mm^2 hotspot)."""
    for name, v in (("count", count), ("theta1", theta1), ("theta2", theta2)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) \
                or v < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative finite number, got {v!r}")
    if theta1 > theta2:
        raise InvalidArgumentError(f"theta1 ({theta1}) must not exceed theta2 ({theta2})")
    return 1 if count <= theta1 else 2 if count <= theta2 else 3


# ----------------------------------------------------------------------------- backends


def _torch(xs, ys, g: _Geometry, row0, row1):
    full = hotspot_counts_ref(torch.stack([xs, ys], 1), row1, g.n_cols, g.step, "circle" if g.circle else "rect",
                              g.r2, g.half_w, g.half_h)
    return full[row0:row1].contiguous()


def hotspot_rows_cpu(xs, ys, g: _Geometry, row0, row1):
    """C++ (csrc/cpu/hotspot_cpu.cpp), OpenMP over rows."""
    out = torch.empty(row1 - row0, g.n_cols, dtype=torch.int32)
    buf = _native.buffer
    _native.cpu().hotspot_rows(buf(xs), buf(ys), g.step, g.n_cols, row0, row1, g.circle, g.r2, g.half_w, g.half_h,
                               buf(out))
    return out


def _numba(xs, ys, g: _Geometry, row0, row1):
    from ..kernels.hotspot_numba import hotspot_rows_numba  # imported late: NUMBA_ENABLE_CUDASIM is read at import

    return hotspot_rows_numba(xs, ys, g, row0, row1)


_IMPLS = {
    "torch": Impl(_torch),
    "cpu": Impl(hotspot_rows_cpu),
    "numba": Impl(_numba),
}
