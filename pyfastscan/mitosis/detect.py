"""Whole-slide mitosis detection and the mitotic hotspot (Tellez et al. 2018, Sec. IV-D;
DESIGN.md 2 and 4).

    res = pyfastscan.detect_mitoses("slide.svs", tellez_cnn_with_weights)
    res.mitoses, res.hotspot_p95, res.grade
    res.save("out/slide")   # mitoses.csv, mitoses.geojson, hotspot.png, report.json

1. The dense probability map of the mitosis class, ROI by ROI (the scan job's reading,
   tissue and ROI plan).
2. Binarised at ``map_threshold`` (0.8); 4-connected components (scipy's default, as
   the scan's post-processing); each is one candidate at its maximum (the first in
   raster order among equal maxima). This runs on bands of ROI rows as they are stitched:
   a component still touching a band's last row is carried into the next band with the
   rows it spans, so the result equals labelling the whole map at once (tested), and no
   whole-slide copy of the map exists.
3. Candidates closer than ``nms_um`` (25 um) to a more probable one are dropped
   (greedy, most probable first).
4. Mitoses: candidates with probability >= ``delta`` (0.970 for counting and grading, as
   in the paper; 0.919 is the paper's F1 operating point).
5. Hotspot (ops.hotspot): the 2 mm^2 circle's 95th percentile of counts over tissue
   (Tellez) and the 10 HPF rectangle's (2.37 mm^2, 4:3) maximum (canine dataset); grade
   1/2/3 from the circle's 95th percentile with theta1 = 6, theta2 = 20.
"""
import contextlib
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from ..errors import InvalidArgumentError
from ..validate import check
from ..ops.hotspot import HotspotStats, hotspot_stats, mitotic_grade
from ..pipeline.engine import Detection, SlideRun, component_maxima, infer_rois, open_scan


def _components(values: np.ndarray, threshold: float):
    from scipy import ndimage

    return ndimage.label(values > threshold)


def detect_on_map(values: np.ndarray, threshold: float = 0.8) -> List[Tuple[float, int, int]]:
    """Candidates of a whole map in one piece: (probability, row, col) of every component
    of ``values > threshold`` at its maximum. The definition the streaming detector
    must equal."""
    labels, n = _components(values, threshold)
    return component_maxima(values, labels)


class BandDetector:
    """:func:`detect_on_map` over a map that arrives as consecutive bands of full rows.

    ``feed(row0, band)`` takes rows [row0, row0 + len(band)); rows never fed are zero. A
    component that touches the last row seen may continue, so it is carried (only its
    cells, over the rows it spans) into the next band; every other component is final.
    """

    def __init__(self, n_cols: int, threshold: float):
        self.n_cols, self.threshold = n_cols, threshold
        self.carry: Optional[np.ndarray] = None
        self.carry_row0 = 0
        self.found: List[Tuple[float, int, int]] = []

    def feed(self, row0: int, band: np.ndarray) -> None:
        if band.shape[1] != self.n_cols:
            raise InvalidArgumentError(f"band has {band.shape[1]} columns, expected {self.n_cols}")
        if self.carry is not None and self.carry_row0 + len(self.carry) != row0:
            self.finish()  # zero rows in between end every open component
        if self.carry is None:
            buf, buf_row0 = band, row0
        else:
            buf, buf_row0 = np.concatenate([self.carry, band]), self.carry_row0
        labels, n = _components(buf, self.threshold)
        open_ = np.unique(labels[-1])
        open_ = open_[open_ > 0]
        closed = np.setdiff1d(np.arange(1, n + 1), open_)
        self.found += [(p, buf_row0 + i, j) for p, i, j in component_maxima(buf, labels, closed)]
        if len(open_):
            keep = np.isin(labels, open_)
            first = int(np.flatnonzero(keep.any(axis=1))[0])
            self.carry = np.where(keep[first:], buf[first:], 0).astype(buf.dtype)
            self.carry_row0 = buf_row0 + first
        else:
            self.carry = None

    def finish(self) -> List[Tuple[float, int, int]]:
        """Close every open component (a zero row after the last one seen); returns all
        candidates found so far."""
        if self.carry is not None:
            self.feed(self.carry_row0 + len(self.carry), np.zeros((1, self.n_cols), dtype=self.carry.dtype))
        return self.found


def suppress(points: np.ndarray, probs: np.ndarray, min_distance: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression: most probable first (ties: smaller
    y, then smaller x), a point closer than ``min_distance`` to a kept one is dropped."""
    from scipy.spatial import cKDTree

    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((points[:, 0], points[:, 1], -probs))
    tree = cKDTree(points)
    gone = np.zeros(n, dtype=bool)
    kept = []
    for i in order:
        if gone[i]:
            continue
        kept.append(i)
        near = np.asarray(tree.query_ball_point(points[i], min_distance), dtype=np.int64)
        if len(near):
            d = np.hypot(*(points[near] - points[i]).T)
            gone[near[d < min_distance]] = True
    return np.asarray(kept, dtype=np.int64)


@dataclass
class MitosisResult(SlideRun):
    """Mitoses (level-0 pixels, probability >= delta), all candidates after NMS, the
    hotspot statistics of both windows and the grade."""

    mitoses: List[Detection]
    candidates: List[Detection]
    circle: HotspotStats
    rect: HotspotStats
    grade: int
    params: dict
    count_mask: object

    @property
    def hotspot_p95(self) -> float:
        return self.circle.percentile_count

    def save(self, folder, command: Optional[str] = None) -> Dict[str, str]:
        """mitoses.csv, mitoses.geojson, hotspot.png and report.json into ``folder``."""
        from .outputs import save_mitoses

        return save_mitoses(self, folder, command)


def detect_mitoses(slide, model: nn.Module, *, alpha: Optional[int] = None, mpp: Optional[float] = None, device="cpu",
                   precision: str = "auto", plan: Optional[str] = None, tissue_mask=None, tissue_labels=None,
                   region_mask=None, roi_outputs="auto", memory: Optional[int] = None,
                   positive_class: Optional[int] = None, mode: str = "auto", patch: Optional[int] = None,
                   stride: Optional[int] = None, normalize=None, batch_size: Optional[int] = None,
                   map_threshold: float = 0.8, nms_um: float = 25.0, delta: float = 0.970,
                   theta: Sequence[float] = (6, 20), step_um: float = 8.0, readers: Optional[int] = None,
                   progress: bool = True, scan_mpp: Optional[float] = None, slide_mpp: Optional[float] = None,
                   model_mpp: Optional[float] = None) -> MitosisResult:
    """Detect mitotic figures over a whole slide and report the hotspot and grade.

    Args:
        slide, model, mpp, scan_mpp, slide_mpp, model_mpp, device, precision, plan, tissue_mask,
            tissue_labels, roi_outputs, memory, positive_class, mode, patch, stride, normalize,
            batch_size, readers, progress: as :func:`scan_slide`.
            The default model is ``tellez_cnn`` (gamma 0.6) with trained weights.
        alpha: dense factor; 1 (default; a DenseModel's own) gives the network's own stride (4 px
            for tellez_cnn).
        region_mask: optional region to count in (default: the tissue mask): a boolean
            image at any downsample (a tumour mask), or polygons (``pyfastscan.io``
            annotations, e.g. ``read_asap_xml(path)`` or ``read_geojson(path)``).
        map_threshold: the map binarisation threshold (0.8).
        nms_um: minimum distance between detections, in um (25 um = 100 px at 0.25 um/px).
        delta: probability a candidate needs to count as a mitosis (0.970).
        theta: grade thresholds on the circle's 95th percentile (6, 20).
        step_um: hotspot grid step.
    """
    for name, v in (("map_threshold", map_threshold), ("delta", delta), ("nms_um", nms_um), ("step_um", step_um)):
        check(name, v)
    if len(theta) != 2:
        raise InvalidArgumentError(f"theta must be (theta1, theta2), got {theta!r}")
    theta = (check("theta1", theta[0]), check("theta2", theta[1]))
    if theta[0] > theta[1]:
        raise InvalidArgumentError(f"theta1 ({theta[0]:g}) must not exceed theta2 ({theta[1]:g})")
    with contextlib.ExitStack() as stack:
        job = open_scan(stack, slide, model, alpha=alpha, mpp=mpp, device=device, precision=precision, plan=plan,
                        tissue_mask=tissue_mask, tissue_labels=tissue_labels, roi_outputs=roi_outputs,
                        memory=memory, readers=readers, mode=mode, patch=patch, stride=stride, normalize=normalize,
                        batch_size=batch_size, positive_class=positive_class, progress=progress, scan_mpp=scan_mpp,
                        slide_mpp=slide_mpp, model_mpp=model_mpp, default_alpha=1)
        s, timings = job.slide, job.timings
        det = BandDetector(job.n_cols, map_threshold)
        band, band_row0 = None, -1

        def flush():
            if band is not None:
                t = time.perf_counter()
                det.feed(band_row0, band)
                timings["postprocess"] += time.perf_counter() - t

        for (r0, c0, rows, cols, *_), block in infer_rois(job, job.rois, device=device, readers=readers,
                                                          label=f"mitosis {s.name}", progress=progress):
            if r0 != band_row0:  # ROIs come row by row: a new ROI row starts a new band
                flush()
                band, band_row0 = np.zeros((rows, job.n_cols), dtype=np.float32), r0
            band[:, c0:c0 + cols] = block
        flush()
        t = time.perf_counter()
        found = det.finish()
        stride, (ox, oy) = job.stride_px, job.origin_px
        pts = np.array([(ox + j * stride, oy + i * stride) for _, i, j in found], dtype=np.float64).reshape(-1, 2)
        probs = np.array([p for p, _, _ in found], dtype=np.float64)
        kept = suppress(pts, probs, nms_um / s.mpp)
        cands = sorted((Detection(float(probs[k]), float(pts[k, 0]), float(pts[k, 1])) for k in kept),
                       key=lambda d: (-d.probability, d.y, d.x))
        mitoses = [d for d in cands if d.probability >= delta]
        counting = job.tissue if region_mask is None else _region(region_mask, s.dimensions)
        xy = np.array([(d.x, d.y) for d in mitoses], dtype=np.float64).reshape(-1, 2)
        common = dict(slide_size=s.dimensions, mpp=s.mpp, step_um=step_um, tissue_mask=counting.mask,
                      mask_downsample=counting.downsample)
        circle = hotspot_stats(xy, window="circle", percentile=95, **common)
        rect = hotspot_stats(xy, window="rect", percentile=100, **common)
        grade = mitotic_grade(circle.percentile_count, *theta)
        timings["postprocess"] += time.perf_counter() - t
        params = dict(map_threshold=map_threshold, nms_um=nms_um, delta=delta, theta=list(theta), step_um=step_um,
                      region_mask=region_mask is not None)
        return MitosisResult(**job.run_info(), mitoses=mitoses, candidates=cands, circle=circle, rect=rect,
                             grade=grade, params=params, count_mask=counting)


def _region(region, slide_size: Tuple[int, int], max_side: int = 4096):
    """The counting region as a TissueMask: a TissueMask as it is, a boolean image at any
    downsample, or polygons (pyfastscan.io.Annotation, e.g. read from ASAP XML or GeoJSON)
    rasterised with at most ``max_side`` pixels on the longer side."""
    from ..io.annotations import Annotation, rasterize
    from ..slide.tissue import TissueMask, user_tissue_mask

    if isinstance(region, TissueMask):
        return region
    if isinstance(region, (list, tuple)) and region and all(isinstance(a, Annotation) for a in region):
        w, h = slide_size
        d = max(1.0, max(w, h) / max_side)
        mask = rasterize(region, (int(np.ceil(h / d)), int(np.ceil(w / d))), d)
        if not mask.any():
            raise InvalidArgumentError("the region polygons cover no part of the slide")
        return TissueMask(mask, d)
    return user_tissue_mask(region, slide_size[0])
