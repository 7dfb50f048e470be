"""Patch datasets from annotated slides (issue 18).

    specs = read_manifest("slides.json")                  # slides, their annotations, train / val
    ds = PatchDataset(specs, mpp=0.5, patch=38, context=48, shares={"positive": 0.5, "negative": 0.5})
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2)
    for x, y in loader: ...                               # x: (N, 3, 48, 48) uint8, y: (N,) 0 / 1

What a slide's annotations say (level-0 pixels), by file type:

- ASAP XML (``.xml``), GeoJSON (``.geojson``, ``.json``): polygons are positive regions (the
  groups in ``positive_groups``, default every group but the exclusion groups, which are cut
  out, see :func:`pyfastscan.io.rasterize`); points are positive points.
- label masks (``.png``, ``.tif``; Camelyon16 ``_Mask.tif``, the context-region masks): the
  pixels whose value is in ``positive_labels`` (default: nonzero) are positive regions;
  with ``negative_labels``, negatives come only from pixels with those values (the rest is
  ignored: artefacts, unlabelled tissue). The mask's downsample is its width against the
  slide's.
- SlideRunner databases (``.sqlite``, ``.db``): points of ``point_class`` ("Mitotic figure")
  are positive points, points of ``lookalike_class`` ("Mitotic figure lookalike") hard
  negatives.
- point CSV (``.csv``, ``x,y`` or ``probability,x,y``, see :mod:`pyfastscan.eval.files`):
  positive points; the files in ``negatives`` (mined lists, candidate lists) are hard
  negatives.
- ``candidates: true``: the Tellez candidate detector's picks on the tissue (read at the
  training resolution) are hard negatives too.

Sampling. Every location is on the *label grid*, cells of ``grid_um`` micrometres. Three
pools, each drawn with its share of the batch (``shares``):

- ``positive`` (label 1): a cell of a positive region (its centre inside the annotation,
  as :func:`~pyfastscan.io.rasterize` decides), the patch centre uniform in the cell; or a
  positive point moved by a uniform jitter of up to ``jitter_um`` on each axis.
- ``negative`` (label 0): a tissue cell (the slide's tissue mask, or the ``negative_labels``
  of its label mask) whose every point is at least ``margin_um`` from every positive cell and
  point; the centre uniform in the cell.
- ``hard`` (label 0): a hard negative point (lookalike, mined, candidate) more than
  ``margin_um`` from the positives, jittered like positive points.

A pool's locations are pooled over the slides (a location is a cell or a point, each
equally likely). Only locations whose whole ``context`` patch lies on the slide are used.

Determinism: draw ``i`` of epoch ``e`` comes from its own generator, seeded by
(seed, e, i): the same seed gives the same draws whichever DataLoader worker reads them,
with any number of workers. Patches are read with the scan engine's reader
(:func:`pyfastscan.pipeline.engine.read_scan_region`), so a training patch has exactly the
pixels a scan of the same place gives the model.
"""
import csv
import io as _io
import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..validate import Number, check, check_optional

POOLS = ("positive", "negative", "hard")
LABELS = {"positive": 1, "negative": 0, "hard": 0}
_POLYGON_EXT = (".xml", ".geojson", ".json")
_MASK_EXT = (".png", ".tif", ".tiff")
_DB_EXT = (".sqlite", ".db", ".sqlite3")


@dataclass(frozen=True)
class SlideSpec:
    """One slide of a training manifest and its annotations (paths; see the module docstring).

    Attributes:
        slide: the slide file.
        annotations: annotation files (polygons, label masks, points, SlideRunner databases).
        split: "train" or "val" (validation is split by slide).
        slide_mpp: level-0 um/px for a slide that does not say its own.
        negatives: point files of hard negatives (mined lists, candidates).
        tissue: a tissue mask image (nonzero = tissue, any downsample); default Otsu on the
            thumbnail, as the scan does.
        positive_groups: polygon groups that are positive (default: all but exclusions).
        positive_labels, negative_labels: label-mask values (see the module docstring).
        point_class, lookalike_class: SlideRunner class names.
        db_slide: the slide's name in a SlideRunner database (default: its file name).
        candidates: add the Tellez candidate detector's picks on the slide's tissue (dark
            blobs, :func:`pyfastscan.ops.candidates`, read at the training resolution) to
            the hard negatives; those near a positive are dropped like any hard negative.
    """

    slide: str
    annotations: Tuple[str, ...] = ()
    split: str = "train"
    slide_mpp: Optional[float] = None
    negatives: Tuple[str, ...] = ()
    tissue: Optional[str] = None
    positive_groups: Optional[Tuple[str, ...]] = None
    positive_labels: Optional[Tuple[int, ...]] = None
    negative_labels: Optional[Tuple[int, ...]] = None
    point_class: str = "Mitotic figure"
    lookalike_class: Optional[str] = "Mitotic figure lookalike"
    db_slide: Optional[str] = None
    candidates: bool = False

    def __post_init__(self):
        if self.split not in ("train", "val"):
            raise InvalidArgumentError(f"{self.slide}: split must be 'train' or 'val', got {self.split!r}")
        check_optional("slide_mpp", self.slide_mpp)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


_LIST_FIELDS = ("annotations", "negatives", "positive_groups", "positive_labels", "negative_labels")


def _spec(entry: dict, folder: str, where: str) -> SlideSpec:
    known = {f.name for f in fields(SlideSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    if not entry.get("slide"):
        raise InvalidArgumentError(f"{where}: no 'slide'")
    kw = {}
    for k, v in entry.items():
        if v is None or v == "":
            continue
        if k in _LIST_FIELDS:
            if isinstance(v, str):
                v = [p for p in v.split(";") if p.strip()]
            if not isinstance(v, (list, tuple)):
                raise InvalidArgumentError(f"{where}: {k} must be a list (or ';'-separated text), got {v!r}")
            v = tuple(int(p) if k.endswith("labels") else str(p).strip() for p in v)
        elif k == "candidates":
            if isinstance(v, str):
                v = v.strip().lower() in ("1", "true", "yes")
            v = bool(v)
        elif k == "slide_mpp":
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"{where}: slide_mpp must be a number, got {v!r}") from None
        kw[k] = v
    for k in ("slide", "tissue"):
        if k in kw:
            kw[k] = os.path.join(folder, kw[k])
    for k in ("annotations", "negatives"):
        if k in kw:
            kw[k] = tuple(os.path.join(folder, p) for p in kw[k])
    try:
        return SlideSpec(**kw)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from None


def read_manifest(path) -> List[SlideSpec]:
    """The slides of a manifest: JSON (a list of objects, or ``{"slides": [...]}``) or CSV
    with a header naming the :class:`SlideSpec` fields (lists ';'-separated). Paths are
    relative to the manifest's folder.

    Example CSV::

        slide,annotations,split
        tumor_001.tif,tumor_001.xml,train
        tumor_002.tif,tumor_002.xml;tumor_002_lookalikes.csv,val
    """
    from ..io._safe import read_bounded

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"manifest {path}: no such file")
    text = read_bounded(path).decode("utf-8", errors="replace")
    folder = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"manifest {path}: not valid JSON ({exc})") from None
        entries = data.get("slides") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InvalidArgumentError(f"manifest {path}: expected a list of slide objects or {{\"slides\": [...]}}")
        specs = [_spec(e, folder, f"manifest {path}: slide {k}") for k, e in enumerate(entries)]
    else:
        rows = list(csv.DictReader(_io.StringIO(text)))
        specs = [_spec({k.strip(): (v or "").strip() for k, v in r.items() if k}, folder,
                       f"manifest {path}: line {k + 2}") for k, r in enumerate(rows)]
    if not specs:
        raise InvalidArgumentError(f"manifest {path}: no slides")
    return specs


def write_manifest(path, specs: Sequence[SlideSpec]) -> str:
    """Write ``specs`` as a JSON manifest (absolute paths), atomically."""
    from ..io.files import write_json

    return write_json(os.fspath(path), {"slides": [s.to_json() for s in specs]}, indent=2)


@dataclass
class SlideLabels:
    """A slide's annotations on its label grid (``d`` level-0 px per cell, ``shape`` cells).

    positive: (H, W) bool, cells of positive regions. near: (H, W) bool, cells some point of
    which is closer than the margin to a positive cell or point (never negatives). tissue:
    (H, W) bool, where negatives may come from. points: (N, 2) positive points, hard: (M, 2)
    hard negative points (x, y level-0), both already kept to those far enough from the
    positives (hard) and the slide's border (both)."""

    name: str
    slide_mpp: float
    size: Tuple[int, int]
    d: float
    positive: np.ndarray
    near: np.ndarray
    tissue: np.ndarray
    points: np.ndarray
    hard: np.ndarray

    def cell_of(self, x, y) -> Tuple[np.ndarray, np.ndarray]:
        """(row, col) of the cells holding level-0 points, clamped to the grid."""
        r = np.clip((np.asarray(y, dtype=np.float64) // self.d).astype(np.int64), 0, self.shape[0] - 1)
        c = np.clip((np.asarray(x, dtype=np.float64) // self.d).astype(np.int64), 0, self.shape[1] - 1)
        return r, c

    @property
    def shape(self) -> Tuple[int, int]:
        return self.positive.shape


def _read_points_file(path: str) -> Tuple[np.ndarray, np.ndarray]:
    from ..eval.files import read_points

    return read_points(path)


def _label_values(path: str, slide_width: int, grid_w: int) -> Tuple[np.ndarray, float]:
    """(values (h, w), level-0 px per value) of a label mask: its first channel, from the
    smallest pyramid level at least ``grid_w`` wide (TIFF), or the whole image."""
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            levels = tf.series[0].levels  # shapes (H, W) or (H, W, C), finest first
            arr = ([lv for lv in levels if lv.shape[1] >= grid_w] or levels[:1])[-1].asarray()
    else:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise InvalidArgumentError(f"label mask {path}: expected a 2-D image, got shape {arr.shape}")
    return arr, slide_width / arr.shape[1]


CANDIDATE_TILE = 2048  # px at the reading resolution: the candidate detector runs tile by tile


def tissue_candidates(s, tissue, mpp: float, d_um: float = 25.0, t: float = 0.6) -> np.ndarray:
    """(K, 2) level-0 (x, y) of the Tellez candidates (:func:`pyfastscan.ops.candidates`) of
    slide ``s`` read at ``mpp``, in tiles of CANDIDATE_TILE px that touch ``tissue`` (a
    TissueMask); each tile is detected on its own (a blob on a seam may be picked twice)."""
    from ..ops import candidates
    from ..pipeline.engine import read_scan_region

    from ..pipeline.engine import scan_level

    scan_ds, level, level_ds = scan_level(s, mpp, "read")
    w0, h0 = s.dimensions
    T = CANDIDATE_TILE
    out = [np.zeros((0, 2))]
    for y in range(0, int(h0 / scan_ds), T):
        for x in range(0, int(w0 / scan_ds), T):
            w, h = min(T, int(w0 / scan_ds) - x), min(T, int(h0 / scan_ds) - y)
            if w < 1 or h < 1 or not tissue.any_in(x * scan_ds, y * scan_ds, (x + w) * scan_ds, (y + h) * scan_ds):
                continue
            c = candidates(read_scan_region(s, x, y, w, h, scan_ds, level, level_ds), d_um=d_um, t=t, mpp=mpp)
            out.append((c + [x + 0.5, y + 0.5]) * scan_ds)  # pixel centres, level-0
    return np.concatenate(out).astype(np.float64)


def slide_labels(spec: SlideSpec, s, *, grid_um: float, margin_um: float, border_px: float = 0.0,
                 jitter_um: float = 0.0, mpp: Optional[float] = None) -> SlideLabels:
    """Rasterise ``spec``'s annotations of the opened slide ``s`` on the label grid.

    ``border_px`` (level-0): locations closer than that (plus the jitter for points) to the
    slide's edge are dropped, so a whole patch can be read around every location."""
    from scipy import ndimage

    from ..io import rasterize, read_annotations
    from ..io.sliderunner import SlideRunnerDB
    from ..slide.tissue import TissueMask, otsu_tissue_mask, user_tissue_mask

    w0, h0 = s.dimensions
    d = grid_um / s.mpp
    gh, gw = max(1, math.ceil(h0 / d)), max(1, math.ceil(w0 / d))
    cy, cx = (np.arange(gh) + 0.5) * d, (np.arange(gw) + 0.5) * d
    positive = np.zeros((gh, gw), dtype=bool)
    allowed = None  # negative_labels' region
    points, hard = [np.zeros((0, 2))], [np.zeros((0, 2))]
    for path in spec.annotations:
        low = path.lower()
        if not os.path.isfile(path):
            raise InvalidArgumentError(f"{spec.slide}: annotation file {path} not found")
        if low.endswith(_POLYGON_EXT):
            anns = read_annotations(path)
            positive |= rasterize(anns, (gh, gw), d, groups=spec.positive_groups)
            pts = [a.coords for a in anns if a.kind == "points" and
                   (spec.positive_groups is None or a.group in spec.positive_groups)]
            points += pts
        elif low.endswith(_MASK_EXT):
            values, ds = _label_values(path, w0, gw)
            grid = TissueMask(values, ds).on_grid(cy, cx)  # nearest value at each cell centre
            positive |= np.isin(grid, spec.positive_labels) if spec.positive_labels else grid != 0
            if spec.negative_labels:
                region = np.isin(grid, spec.negative_labels)
                allowed = region if allowed is None else allowed | region
        elif low.endswith(_DB_EXT):
            name = spec.db_slide or os.path.basename(spec.slide)
            with SlideRunnerDB(path) as db:
                points.append(db.points(name, spec.point_class))
                if spec.lookalike_class and spec.lookalike_class in db.classes().values():
                    look = db.points(name, spec.lookalike_class)
                    hard.append(look)
        elif low.endswith(".csv"):
            points.append(_read_points_file(path)[0])
        else:
            raise InvalidArgumentError(f"{spec.slide}: annotation file {path}: unknown type (expected "
                                       f"{', '.join(_POLYGON_EXT + _MASK_EXT + _DB_EXT)} or .csv)")
    for path in spec.negatives:
        hard.append(_read_points_file(path)[0])
    points, hard = np.concatenate(points), np.concatenate(hard)

    if spec.tissue:
        from PIL import Image

        with Image.open(spec.tissue) as im:
            tissue_mask = user_tissue_mask(np.asarray(im), w0)
    else:
        thumb, thumb_ds = s.thumbnail()
        tissue_mask = otsu_tissue_mask(thumb, thumb_ds)
    tissue = tissue_mask.on_grid(cy, cx)
    if spec.candidates:
        if mpp is None:
            raise InvalidArgumentError(f"{spec.slide}: candidate negatives need the reading resolution (mpp)")
        cand = tissue_candidates(s, tissue_mask, mpp)
        if len(cand):
            r = np.clip((cand[:, 1] // d).astype(np.int64), 0, gh - 1)
            cand = cand[tissue[r, np.clip((cand[:, 0] // d).astype(np.int64), 0, gw - 1)]]
        hard = np.concatenate([hard, cand])
    if allowed is not None:
        tissue = allowed

    # the margin: a cell is "near" when some point of it may be closer than margin_px to
    # some point of a positive cell (or the cell of a positive point): the centre distance
    # less the two half-diagonals d / sqrt(2) each
    margin_px = margin_um / s.mpp
    seeds = positive.copy()
    if len(points):
        r = np.clip((points[:, 1] // d).astype(np.int64), 0, gh - 1)
        c = np.clip((points[:, 0] // d).astype(np.int64), 0, gw - 1)
        seeds[r, c] = True
    if seeds.any():
        dist = ndimage.distance_transform_edt(~seeds) * d
        near = dist < margin_px + d * math.sqrt(2)
    else:
        near = np.zeros_like(seeds)

    def inside(xy, pad):
        lo = border_px + pad
        return (xy[:, 0] >= lo) & (xy[:, 0] <= w0 - lo) & (xy[:, 1] >= lo) & (xy[:, 1] <= h0 - lo)

    j = jitter_um / s.mpp
    keep = inside(points, j) if len(points) else np.zeros(0, dtype=bool)
    points = points[keep]
    if len(hard):
        r = np.clip((hard[:, 1] // d).astype(np.int64), 0, gh - 1)
        c = np.clip((hard[:, 0] // d).astype(np.int64), 0, gw - 1)
        keep = inside(hard, j) & ~near[r, c]
        if len(points):  # the jittered centre stays margin_px + j from each positive point
            far = np.ones(len(hard), dtype=bool)
            for k in range(0, len(hard), 4096):
                diff = hard[k:k + 4096, None, :] - points[None, :, :]
                far[k:k + 4096] = (np.sqrt((diff ** 2).sum(-1)) >= margin_px + j * math.sqrt(2)).all(axis=1)
            keep &= far
        hard = hard[keep]
    # cells whose every point lies at least border_px inside the slide
    ok_r = (np.arange(gh) * d >= border_px) & ((np.arange(gh) + 1) * d <= h0 - border_px)
    ok_c = (np.arange(gw) * d >= border_px) & ((np.arange(gw) + 1) * d <= w0 - border_px)
    fits = ok_r[:, None] & ok_c[None, :]
    return SlideLabels(spec.slide, s.mpp, (w0, h0), d, positive & fits, near, tissue & ~near & ~positive & fits,
                       points, hard)


class Draw(NamedTuple):
    """One sampled location: the slide (index), the pool, the label and the patch centre
    (x, y) in level-0 pixels."""

    slide: int
    pool: str
    label: int
    x: float
    y: float


class PatchDataset(torch.utils.data.Dataset):
    """Patches from annotated slides, class-balanced by pool shares (module docstring).

    Args:
        slides: :class:`SlideSpec` list (or a manifest path, see :func:`read_manifest`).
        mpp: the resolution patches are read at, um/px (the model's training resolution).
        patch: the model's input side in pixels (what augmentation crops to).
        context: the side read around each centre (>= patch, context - patch even; default
            patch), room for rotation, zoom and elastic deformation before the crop.
        length: draws per epoch (``len(dataset)``).
        shares: pool -> share of the draws ("positive", "negative", "hard"); normalised.
            A pool with a share must have locations.
        grid_um: label-grid cell side in um (default 8).
        margin_um: negatives keep this far from every positive (default 0.5 patch).
        jitter_um: uniform shift of point-centred patches on each axis (default 0.25 patch).
        positive_inset_um: positive region cells must lie this deep inside their region
            (the distance from the cell's centre to the nearest cell centre outside it, less
            half a cell; default 0: every cell), so that positive patches of small regions
            are not mostly their surroundings.
        seed: the draws' seed; ``set_epoch`` changes the epoch.
        split: use only the slides of this split ("train", "val"), or None for all.
    Returns (``ds[i]``):
        (uint8 tensor (3, context, context), int64 label).
    """

    def __init__(self, slides, mpp: float, patch: int, *, context: Optional[int] = None, length: int = 10_000,
                 shares: Optional[Dict[str, float]] = None, grid_um: float = 8.0, margin_um: Optional[float] = None,
                 jitter_um: Optional[float] = None, seed: int = 0, split: Optional[str] = None,
                 positive_inset_um: float = 0.0):
        if isinstance(slides, (str, os.PathLike)):
            slides = read_manifest(slides)
        self.specs = [s for s in slides if split is None or s.split == split]
        if not self.specs:
            raise InvalidArgumentError(f"no slides{f' in split {split!r}' if split else ''} to sample from")
        self.mpp = check("mpp", mpp)
        self.patch = check("patch", patch)
        self.context = self.patch if context is None else check("patch", context)
        if self.context < self.patch or (self.context - self.patch) % 2:
            raise InvalidArgumentError(f"context ({self.context}) must be >= patch ({self.patch}) and differ from it "
                                       "by an even number of pixels (the patch is its centre)")
        self.length = check("length", length, Number(integer=True, lo=1))
        self.grid_um = check("grid_um", grid_um, Number(lo=0, lo_open=True, hi=1e4))
        self.margin_um = 0.5 * self.patch * self.mpp if margin_um is None else \
            check("margin_um", margin_um, Number(lo=0, hi=1e6))
        self.jitter_um = 0.25 * self.patch * self.mpp if jitter_um is None else \
            check("jitter_um", jitter_um, Number(lo=0, hi=1e6))
        self.positive_inset_um = check("positive_inset_um", positive_inset_um, Number(lo=0, hi=1e6))
        self.seed, self.epoch = int(seed), 0
        shares = dict(shares or {"positive": 0.5, "negative": 0.5})
        bad = [k for k in shares if k not in POOLS]
        if bad or any(not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)) for v in shares.values()) \
                or sum(shares.values()) <= 0:
            raise InvalidArgumentError(f"shares must map pools {POOLS} to non-negative numbers with a positive sum, "
                                       f"got {shares}")
        self._prepare()
        total = sum(shares.values())
        self.shares = {k: v / total for k, v in shares.items() if v > 0}
        empty = [k for k in self.shares if self.counts[k].sum() == 0]
        if empty:
            raise InvalidArgumentError(f"pool(s) {empty} have no locations in these slides ({self.summary()}); give "
                                       f"them no share, or annotations / negatives that provide them")
        self._pools = list(self.shares)
        self._p = np.array([self.shares[k] for k in self._pools])

    # ------------------------------------------------------------------ labels
    def _prepare(self) -> None:
        from ..pipeline.engine import scan_level
        from ..slide import open_slide

        self.labels: List[SlideLabels] = []
        self.levels = []
        for spec in self.specs:
            s = open_slide(spec.slide, default_mpp=spec.slide_mpp)
            try:
                scan_ds, level, level_ds = scan_level(s, self.mpp, "read")
                border = (self.context / 2 + 1) * scan_ds
                self.labels.append(slide_labels(spec, s, grid_um=self.grid_um, margin_um=self.margin_um,
                                                border_px=border, jitter_um=self.jitter_um, mpp=self.mpp))
                self.levels.append((scan_ds, level, level_ds))
            finally:
                s.close()
        self._cells = {"positive": [np.flatnonzero(self._core(lb)) for lb in self.labels],
                       "negative": [np.flatnonzero(lb.tissue) for lb in self.labels]}
        self.counts = {
            "positive": np.array([len(c) + len(lb.points) for c, lb in zip(self._cells["positive"], self.labels)]),
            "negative": np.array([len(c) for c in self._cells["negative"]]),
            "hard": np.array([len(lb.hard) for lb in self.labels])}
        self._cum = {k: np.cumsum(v) for k, v in self.counts.items()}

    def _core(self, lb: SlideLabels) -> np.ndarray:
        """The positive cells at least positive_inset_um inside their region."""
        if self.positive_inset_um <= 0 or not lb.positive.any():
            return lb.positive
        from scipy import ndimage

        depth = ndimage.distance_transform_edt(np.pad(lb.positive, 1))[1:-1, 1:-1] * lb.d - lb.d / 2
        return lb.positive & (depth >= self.positive_inset_um / lb.slide_mpp)  # level-0 px

    def summary(self) -> str:
        return ", ".join(f"{k}: {int(v.sum())} locations" for k, v in self.counts.items())

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws ``__getitem__`` gives (see the module docstring)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    # ------------------------------------------------------------------ draws
    def draw(self, i: int) -> Draw:
        """Where draw ``i`` of the current epoch reads (no pixels read)."""
        if not 0 <= i < self.length:
            raise IndexError(f"draw {i} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        pool = self._pools[int(rng.choice(len(self._pools), p=self._p))]
        k = int(rng.integers(self._cum[pool][-1]))
        si = int(np.searchsorted(self._cum[pool], k, side="right"))
        local = k - (int(self._cum[pool][si - 1]) if si else 0)
        lb = self.labels[si]
        cells = self._cells.get(pool, [np.zeros(0, np.int64)] * len(self.labels))[si]
        if local < len(cells):
            r, c = divmod(int(cells[local]), lb.shape[1])
            x, y = (c + rng.random()) * lb.d, (r + rng.random()) * lb.d
        else:
            pts = lb.points if pool == "positive" else lb.hard
            j = self.jitter_um / lb.slide_mpp
            px, py = pts[local - len(cells)]
            x, y = px + rng.uniform(-j, j), py + rng.uniform(-j, j)
        return Draw(si, pool, LABELS[pool], float(x), float(y))

    def _slide(self, k: int):
        """Slide ``k``, opened once per process (DataLoader workers each open their own)."""
        from ..slide import open_slide

        cache = getattr(self, "_open", None)
        if cache is None or cache[0] != os.getpid():
            cache = self._open = (os.getpid(), {})
        if k not in cache[1]:
            cache[1][k] = open_slide(self.specs[k].slide, default_mpp=self.specs[k].slide_mpp)
        return cache[1][k]

    def read(self, d: Draw) -> np.ndarray:
        """(context, context, 3) uint8: the pixels around ``d``'s centre at ``mpp``. The
        patch covering scan-level pixels [x, x + side) has its centre at x + side / 2."""
        from ..pipeline.engine import read_scan_region

        scan_ds, level, level_ds = self.levels[d.slide]
        S = self.context
        x0 = int(math.floor(d.x / scan_ds - S / 2 + 0.5))
        y0 = int(math.floor(d.y / scan_ds - S / 2 + 0.5))
        return read_scan_region(self._slide(d.slide), x0, y0, S, S, scan_ds, level, level_ds)

    def __getitem__(self, i: int):
        d = self.draw(i)
        return torch.from_numpy(self.read(d)).permute(2, 0, 1).contiguous(), torch.tensor(d.label)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_open", None)  # open slides stay in their process
        return state

    def with_negatives(self, extra: Dict[str, str], shares: Dict[str, float]) -> "PatchDataset":
        """A dataset like this one whose slides have the hard-negative files ``extra``
        (slide path -> file) added, drawn with ``shares``."""
        specs = [replace(s, negatives=tuple(s.negatives) + ((extra[s.slide],) if s.slide in extra else ()))
                 for s in self.specs]
        return PatchDataset(specs, self.mpp, self.patch, context=self.context, length=self.length, shares=shares,
                            grid_um=self.grid_um, margin_um=self.margin_um, jitter_um=self.jitter_um, seed=self.seed,
                            positive_inset_um=self.positive_inset_um)
