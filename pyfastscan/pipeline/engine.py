"""The scan engine every slide job runs on (DESIGN.md 2.4): open the slide, make the
scanner, pick the scan level, find tissue, plan the ROIs, read them through the input
pipeline, run the model, check its output. Jobs (:func:`~pyfastscan.pipeline.scan.scan_slide`,
:func:`~pyfastscan.mitosis.detect_mitoses`, the cohort) build on it and add their own
stitching and post-processing.

    job = open_scan(stack, slide, model, ...)          # a ScanJob: level, tissue, ROI plan
    for roi, block in infer_rois(job, job.rois, ...):   # probability blocks, ROI by ROI
        ...

ROIs of L x L map cells sit at ROI stride S_r = S_p' * L_m' (their maps tile the whole-slide
map with no overlap and no gap). Map cell (i, j) is the patch whose top-left corner is
(j, i) * step at the scan level.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..dense import DenseModel
from ..errors import InvalidArgumentError, ModelOutputError
from ..progress import Progress
from ..slide.reader import Slide, open_slide
from ..slide.tissue import TissueMask, otsu_tissue_mask, user_tissue_mask
from ..validate import check, check_optional
from .readers import default_readers, max_read_ahead

class Roi(NamedTuple):
    """One ROI of the plan: the map cells [row, row + rows) x [col, col + cols), computed
    from the scan-level pixels [x, x + width) x [y, y + height) (paper Eq. 2)."""

    row: int
    col: int
    rows: int
    cols: int
    x: int
    y: int
    width: int
    height: int


@dataclass
class Detection:
    """A connected component of the thresholded map, at its maximum (level-0 pixels)."""

    probability: float
    x: float
    y: float


@dataclass
class SlideRun:
    """What every slide job reports about the slide and the run (level-0 pixels)."""

    slide_name: str
    slide_mpp: float
    slide_size: Tuple[int, int]
    geometry: dict
    tissue: TissueMask
    n_rois: int
    n_rois_total: int
    timings: Dict[str, float]
    thumbnail: Optional[np.ndarray] = field(repr=False)
    thumbnail_downsample: float
    model: dict  # what was scanned and how: mode, the weights file's card (see ScanJob.model_info)
    cells: dict  # map cells computed (the tissue ROIs'), on tissue, and their ratio (see ScanJob.cells)


def memory_budget(device) -> int:
    """Default bytes a scan may use for one ROI: half the free memory of a CUDA device; on
    the CPU a quarter of the available memory, at most 1 GiB (larger ROIs do not run
    faster there: activations that stay in cache matter more than the halo they save).
    "Available" is the least of MemAvailable, the cgroup's limit minus its usage and
    RLIMIT_AS minus the address space in use (see pipeline/memory.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    from .memory import available_memory

    avail = available_memory()
    return int(min(avail / 4, 1 << 30)) if avail is not None else 1 << 30


def check_map_fits(name: str, n_rows: int, n_cols: int, scan_mpp: float) -> None:
    """Refuse, before any work, a whole-slide map (float32) larger than the memory left."""
    from ..slide.reader import SlideError
    from .memory import available_memory

    need, avail = n_rows * n_cols * 4, available_memory()
    if avail is not None and need > avail:
        raise SlideError(f"{name}: its map at {scan_mpp:g} um/px is {n_rows} x {n_cols} cells ({need / 2**30:.1f} GiB), "
                         f"more than the {avail / 2**30:.1f} GiB of memory available; scan at a coarser resolution")


def choose_roi_outputs(dense: DenseModel, budget: int, readers: int = 2, limit: int = 256) -> int:
    """L_m': the largest number of map cells per ROI side (at most ``limit``) whose forward
    pass and ``max_read_ahead(readers)`` + 1 ROI buffers, each counted in the model's input
    dtype (float32 or float64), fit in ``budget`` bytes (overlapped, the readers fill that
    many input buffers; in phases, that many buffers' bytes of uint8 pixels and one input
    buffer per ROI shape). The
    forward pass is counted as twice :meth:`DenseModel.activation_bytes`: the backends'
    layout reorders and workspaces come on top of the tensors PyTorch holds (oneDNN on
    this project's CPU peaked at 1.3-1.9x them, measured with VmHWM)."""
    g = dense.geometry
    item = dense.input_dtype.itemsize

    def need(L):
        side = g.input_side(L)
        return 2 * dense.activation_bytes(side) + (max_read_ahead(readers) + 1) * 3 * side * side * item

    if need(1) > budget:
        raise InvalidArgumentError(f"a single patch ({g.patch} px) needs {need(1) / 2**20:.0f} MiB, more than the "
                                   f"memory budget of {budget / 2**20:.0f} MiB")
    lo, hi = 1, limit
    while lo < hi:  # need() grows with L
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid - 1)
    return lo


def scan_key(job: "ScanJob") -> dict:
    """Everything that changes the map of a scan: a checkpoint resumes only under the same key."""
    from .checkpoint import weights_digest

    s, dense, g = job.slide, job.dense, job.dense.geometry
    return dict(slide=os.path.basename(str(s.name)), slide_size=list(s.dimensions), slide_mpp=s.mpp,
                scan_mpp=job.scan_mpp, patch=g.patch, stride=g.stride, alpha=g.alpha, mode=job.mode, plan=dense.plan,
                precision=job.precision, roi_outputs=job.roi_outputs, positive_class=job.positive_class,
                weights=weights_digest(dense), tissue=tissue_digest(job.tissue))


def tissue_digest(tissue: TissueMask) -> str:
    """The tissue mask's identity (its pixels, shape and downsample): which ROIs are scanned
    and which cells are no-data depend on it, so a checkpoint made with another mask (another
    --tissue-mask) does not resume."""
    import hashlib

    h = hashlib.sha256(np.packbits(np.asarray(tissue.mask, dtype=bool)).tobytes())
    h.update(repr((tuple(tissue.mask.shape), float(tissue.downsample))).encode())
    return h.hexdigest()[:16]


@dataclass
class ScanJob:
    """A slide opened and planned for dense scanning: what both the heat-map scan and the
    mitosis job share. Built by :func:`open_scan`; ``rois`` are the tissue ROIs in
    row-major order (see :func:`plan_rois`)."""

    slide: Slide
    dense: DenseModel
    scan_mpp: float
    scan_ds: float
    n_rows: int
    n_cols: int
    roi_outputs: int
    tissue: TissueMask
    thumbnail: np.ndarray
    thumbnail_downsample: float
    rois: list
    n_total: int
    level: int
    timings: Dict[str, float]
    t0: float
    mode: str = "dense"
    positive_class: int = 1
    note: Optional[str] = None
    card: Optional[object] = None  # the model's ModelCard, if its weights file had one
    precision: str = "fp32"  # what ran: fp32, tf32 or bf16 ("auto" resolved)
    precision_reason: str = "requested"
    readers: int = 2  # reader threads
    cells_tissue: int = 0  # map cells whose patch touches tissue (the others are 0 without being computed)
    # each tissue ROI's cells_on_tissue, by (row, col), made once by open_scan: the scan's
    # main thread only looks it up (it runs beside the readers, whose cores it takes)
    on_tissue: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    memory: Optional[int] = None  # the memory budget (bytes) the ROI size was chosen under

    @property
    def stride_px(self) -> float:
        """Level-0 pixels between neighbouring map cells."""
        return self.dense.geometry.step * self.scan_ds

    @property
    def origin_px(self) -> Tuple[float, float]:
        """Level-0 centre of map cell (0, 0)."""
        c = self.dense.geometry.patch / 2 * self.scan_ds
        return (c, c)

    def cells_on_tissue(self, roi: Roi) -> np.ndarray:
        """(rows, cols) bool of a ROI's map cells whose patch touches tissue: the others are
        0 (no data), so the map does not depend on how the ROIs tile it."""
        hit = self.on_tissue.get((roi.row, roi.col))
        if hit is not None and hit.shape == (roi.rows, roi.cols):
            return hit
        return cells_on_tissue(self.dense.geometry, self.tissue, self.scan_ds, roi)

    def run_info(self) -> dict:
        """The :class:`SlideRun` fields of this job (timings finished with the total)."""
        g = self.dense.geometry
        self.timings["total"] = time.perf_counter() - self.t0
        return dict(slide_name=self.slide.name, slide_mpp=self.slide.mpp, slide_size=self.slide.dimensions,
                    geometry=dict(patch=g.patch, stride=g.stride, alpha=g.alpha, step=g.step, mode=self.mode,
                                  plan=self.dense.plan, precision=self.precision, roi_outputs=self.roi_outputs,
                                  positive_class=self.positive_class),
                    tissue=self.tissue, n_rois=len(self.rois), n_rois_total=self.n_total, timings=self.timings,
                    thumbnail=self.thumbnail, thumbnail_downsample=self.thumbnail_downsample, model=self.model_info(),
                    cells=self.cells())

    def cells(self) -> dict:
        """Map cells the tissue ROIs compute, cells on tissue, and computed / tissue (the
        work spent on halo-free glass around the tissue: 1 would be none)."""
        computed = sum(r.rows * r.cols for r in self.rois)
        return dict(computed=computed, tissue=self.cells_tissue,
                    computed_per_tissue=round(computed / self.cells_tissue, 4) if self.cells_tissue else None)

    def model_info(self) -> dict:
        """The model as report.json records it: mode (and why patch mode), and what its
        weights file said (architecture, classes, positive class, training resolution,
        normalisation), when it said it."""
        info = dict(mode=self.mode, positive_class=self.positive_class, precision=self.precision,
                    precision_reason=self.precision_reason)
        if getattr(self.dense, "layout_used", None) is not None:  # float32 on the CPU, once it ran
            info.update(layout=self.dense.layout_used, layout_reason=self.dense.layout_reason)
        if self.note:
            info["note"] = self.note
        if self.card is not None:
            c = self.card
            info.update(arch=c.arch, arch_kwargs=c.arch_kwargs, classes=list(c.classes), trained_mpp=c.mpp,
                        normalize=None if c.normalize is None else dict(mean=list(c.normalize[0]),
                                                                         std=list(c.normalize[1])))
        return info


def resolve_scan_mpp(name: str, level0_mpp: float, scan_mpp: Optional[float], model_mpp: Optional[float]) -> float:
    """The resolution to scan at: ``scan_mpp`` if given, else the model's own resolution
    ``model_mpp`` (from its weights' metadata), else level 0. Warns when it differs from
    ``model_mpp`` by more than 10%: the model then sees tissue at a scale it was not
    trained on."""
    import warnings

    chosen = scan_mpp if scan_mpp is not None else model_mpp if model_mpp is not None else level0_mpp
    if model_mpp is not None and abs(chosen / model_mpp - 1) > 0.1:
        warnings.warn(f"{name}: scanning at {chosen:g} um/px, but the model was trained at {model_mpp:g} um/px "
                      f"({chosen / model_mpp:.2f}x): expect worse results", UserWarning, stacklevel=3)
    return float(chosen)


def built_model_options(model: nn.Module, alpha: Optional[int], plan: Optional[str], precision: str,
                        default_alpha: int) -> Tuple[int, str, str, Optional[str]]:
    """(alpha, plan, precision, why the precision) to build the scanner with. A DenseModel
    is already built: its own alpha, plan and precision are used, and one that is asked
    for and differs is refused rather than ignored. Otherwise None means the default
    (``default_alpha``, the "minimal" plan)."""
    if not isinstance(model, DenseModel):
        return (default_alpha if alpha is None else alpha), (plan or "minimal"), precision, None
    own = dict(alpha=model.geometry.alpha, plan=model.plan, precision=model.precision)
    same = precision == "auto" or (precision == "tf32" and own["precision"] == "fp32")  # tf32: how fp32 runs on CUDA
    asked = dict(alpha=alpha, plan=plan, precision=None if same else precision)
    clash = [f"{k}={asked[k]!r} (it has {own[k]!r})" for k in own if asked[k] is not None and asked[k] != own[k]]
    if clash:
        raise InvalidArgumentError(f"the model is a DenseModel, already built: {', '.join(clash)}; leave these "
                                   "arguments out, or pass the nn.Module (or call to_dense again)")
    return own["alpha"], own["plan"], (own["precision"] if precision == "auto" else precision), \
        ("the DenseModel's own" if precision == "auto" else None)


def scan_level(s, mpp: float, verb: str = "scan") -> Tuple[float, int, float]:
    """(downsample from level 0, the level read, that level's downsample) for reading ``s``
    at ``mpp`` um/px: the scan's and a training patch's alike, so both read the same pixels.
    A resolution within 0.1% of a level's snaps to it, with the level's true downsample
    (2.000337, ...): its own pixels, not a resampling."""
    scan_ds = mpp / s.mpp
    if scan_ds < 0.999:
        raise InvalidArgumentError(f"{s.name}: cannot {verb} at {mpp} um/px, finer than level 0 ({s.mpp} um/px)")
    level = s.best_level(scan_ds)
    level_ds = float(s.handle.level_downsamples[level])
    if abs(scan_ds / level_ds - 1) < 1e-3:
        scan_ds = level_ds
    return scan_ds, level, level_ds


def open_scan(stack: contextlib.ExitStack, slide, model: nn.Module, *, alpha: Optional[int], mpp: Optional[float],
              device, precision: str, plan: Optional[str], tissue_mask, tissue_labels, roi_outputs, memory: Optional[int],
              readers: Optional[int], mode: str = "auto", patch: Optional[int] = None,
              stride: Optional[int] = None, normalize=None, batch_size: Optional[int] = None,
              positive_class: Optional[int] = None, progress: bool = False, scan_mpp: Optional[float] = None,
              slide_mpp: Optional[float] = None, model_mpp: Optional[float] = None,
              default_alpha: int = 2, scanners: Optional[dict] = None) -> ScanJob:
    """Open ``slide`` (closed by ``stack`` if opened here), make the scanner (dense or
    patch mode, :func:`make_scanner`; cached in ``scanners`` when given, see
    :func:`cached_scanner`), find the tissue and plan the ROIs. Arguments as
    :func:`scan_slide`."""
    from ..precision import resolve_precision, tf32_mode

    timings = {"open": 0.0, "tissue": 0.0, "read_wait": 0.0, "infer": 0.0, "postprocess": 0.0}
    t0 = time.perf_counter()
    for name, v in (("mpp", mpp), ("scan_mpp", scan_mpp), ("slide_mpp", slide_mpp), ("model_mpp", model_mpp)):
        check_optional(name, v)
    if mpp is not None:  # the old single option: the scan resolution, and level 0's where the slide has none
        scan_mpp = mpp if scan_mpp is None else scan_mpp
        slide_mpp = mpp if slide_mpp is None else slide_mpp
    opened = not isinstance(slide, Slide)
    s = open_slide(slide, default_mpp=slide_mpp) if opened else slide
    if opened:
        stack.callback(s.close)
    if roi_outputs != "auto":
        check("roi_outputs", roi_outputs)
    readers = default_readers() if readers is None else check("readers", readers)
    alpha, plan, precision, own_reason = built_model_options(model, alpha, plan, precision, default_alpha)
    check("alpha", alpha)
    check_optional("memory", memory)
    budget = memory if memory is not None else memory_budget(device)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    precision, precision_reason = resolve_precision(precision, device, None if param is None else param.dtype)
    precision_reason = own_reason or precision_reason
    stack.enter_context(tf32_mode(device, precision == "tf32"))  # fp32 on CUDA is true fp32
    sc = cached_scanner(scanners, model, mode=mode, alpha=alpha, plan=plan,
                        precision="fp32" if precision == "tf32" else precision, normalize=normalize, patch=patch,
                        stride=stride, batch_size=batch_size, positive_class=positive_class, memory=budget)
    if sc.note and progress:
        print(f"pyfastscan: {sc.note}", file=sys.stderr, flush=True)
    if model_mpp is None and sc.card is not None:
        model_mpp = sc.card.mpp  # the resolution the weights file says the model was trained at
    scan_mpp = resolve_scan_mpp(s.name, s.mpp, scan_mpp, model_mpp)
    scan_ds, level, level_ds = scan_level(s, scan_mpp)
    if scan_ds == level_ds:
        scan_mpp = s.mpp * level_ds
    dense = sc.model.to(device)
    g = dense.geometry
    w0, h0 = s.dimensions
    scan_w, scan_h = (int(v) for v in s.handle.level_dimensions[level]) if scan_ds == level_ds else \
        (int(w0 / scan_ds), int(h0 / scan_ds))
    n_rows, n_cols = g.output_side(scan_h), g.output_side(scan_w)
    if n_rows == 0 or n_cols == 0:
        raise InvalidArgumentError(f"{s.name}: {scan_w} x {scan_h} px at {scan_mpp} um/px is smaller than one "
                                   f"patch ({g.patch} px)")
    check_map_fits(s.name, n_rows, n_cols, scan_mpp)
    timings["open"] = time.perf_counter() - t0

    t = time.perf_counter()
    thumb, thumb_ds = s.thumbnail()
    if tissue_mask is None:
        tissue = otsu_tissue_mask(thumb, thumb_ds)
    elif isinstance(tissue_mask, TissueMask):
        tissue = tissue_mask
    else:
        tissue = user_tissue_mask(tissue_mask, w0, tissue_labels)
    if roi_outputs == "auto":  # the least work among the sizes that fit the memory budget
        roi_outputs = least_work_roi_outputs(g, n_rows, n_cols, choose_roi_outputs(dense, budget, readers), tissue,
                                             scan_ds)
    rois, n_total = plan_rois(g, n_rows, n_cols, roi_outputs, tissue, scan_ds)
    on_tissue = rois_cells_on_tissue(g, tissue, scan_ds, rois)
    cells_tissue = sum(int(m.sum()) for m in on_tissue.values())
    timings["tissue"] = time.perf_counter() - t
    return ScanJob(s, dense, scan_mpp, scan_ds, n_rows, n_cols, roi_outputs, tissue, thumb, thumb_ds, rois, n_total,
                   level, timings, t0, sc.mode, sc.positive_class, sc.note, sc.card, precision,
                   precision_reason, readers, cells_tissue, on_tissue, budget)


def cached_scanner(cache: Optional[dict], model: nn.Module, **kwargs):
    """:func:`~pyfastscan.pipeline.scanner.make_scanner` of ``model`` with ``kwargs``, kept in
    ``cache`` (a dict the caller holds; None: no cache) so that a worker scanning many
    slides converts its model once. The memory budget is part of the key only in patch
    mode (where it sets the batch size); a dense conversion does not depend on it."""
    from .scanner import make_scanner

    if cache is None:
        return make_scanner(model, **kwargs)
    key = (id(model), repr(sorted((k, v) for k, v in kwargs.items() if k != "memory")))
    hit = cache.get(key)
    if hit is not None and hit[0] is model and (hit[1].mode == "dense" or hit[2] == kwargs.get("memory")):
        return hit[1]
    sc = make_scanner(model, **kwargs)
    cache[key] = (model, sc, kwargs.get("memory"))  # holds the model: its id stays its own
    return sc


def infer_rois(job: ScanJob, todo: list, *, device, label: str, progress: bool, readers: Optional[int] = None):
    """Yield (roi, probability block) for each ROI of ``todo`` in order, through the input
    pipeline (:class:`~pyfastscan.pipeline.readers.RoiPipeline`): ``readers`` reader
    threads (default: the job's), reusable buffers, copies and compute overlapped on CUDA. Read waits and
    inference time go into job.timings; cells whose patch touches no tissue are 0."""
    from .readers import RoiPipeline

    dense, s = job.dense, job.slide
    level_ds = s.handle.level_downsamples[job.level]
    softmax = not dense.ends_with_softmax
    positive_class = job.positive_class

    def read(roi: Roi):
        return read_scan_region(s, roi.x, roi.y, roi.width, roi.height, job.scan_ds, job.level, level_ds)

    def run(x):
        out = dense(x)
        if positive_class >= out.shape[1]:
            raise InvalidArgumentError(f"positive_class is {positive_class}, but the model has {out.shape[1]} output "
                                       f"channel(s) (0 .. {out.shape[1] - 1})")
        return (F.softmax(out, dim=1) if softmax else out)[0, positive_class]

    bar = Progress(len(todo), label, progress, unit="ROIs")
    fmt = dense.input_memory_format(device) if hasattr(dense, "input_memory_format") else torch.contiguous_format
    pipe = RoiPipeline(read, todo, run, device=device, in_dtype=dense.input_dtype, readers=readers or job.readers,
                       timings=job.timings, memory_format=fmt, phase=phase_rois(job, todo))
    for done, (roi, block) in enumerate(pipe, start=1):
        check_finite(block, roi, s.name)
        np.copyto(block, 0, where=~job.cells_on_tissue(roi))  # no-data, whatever the ROI size (DESIGN.md 6.2)
        yield roi, block
        bar.update(done)


PHASE_BYTES = 128 << 20  # phases longer than the pipeline's default hold at most this many bytes of uint8 ROIs


def phase_rois(job: ScanJob, todo: list) -> Optional[int]:
    """ROIs per phase of a CPU scan in phases (readers.RoiPipeline): as many uint8 ROIs of
    the largest size as fit in what the memory budget leaves beside the forward pass and
    one input buffer (:func:`choose_roi_outputs` counts both), at most ``PHASE_BYTES``;
    None without a budget. The pipeline never reads fewer per phase than its default (the
    read-ahead buffers' bytes, which the budget counts), so the default may exceed it.
    Fewer, longer phases: each phase's end waits for its slowest read (bench_scan's 196
    ROIs: reads 0.17-0.19 s in phases of 20, 0.14-0.15 s in one)."""
    if not job.memory or not todo:
        return None
    dense = job.dense
    side = max(max(r.width, r.height) for r in todo)
    spare = job.memory - 2 * dense.activation_bytes(side) - 3 * side * side * dense.input_dtype.itemsize
    return max(1, int(min(spare, PHASE_BYTES) // (3 * side * side)))


def check_finite(block: np.ndarray, roi, name: str) -> None:
    """Stop the slide at the first ROI whose map is not all finite: a NaN would be written
    as probability 0 and an infinity as 1, and nothing would say the model is broken."""
    if np.isfinite(block).all():
        return
    bad = np.argwhere(~np.isfinite(block))[0]
    what = "/".join(w for w, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(block).any())
    raise ModelOutputError(f"{name}: the model produced {what} in ROI (row {roi[0]}, col {roi[1]}) (first at map "
                           f"cell ({roi[0] + bad[0]}, {roi[1] + bad[1]})): check the weights and the input "
                           "normalisation")


def cells_on_tissue(g, tissue: TissueMask, scan_ds: float, roi: Roi) -> np.ndarray:
    """(rows, cols) bool of ``roi``'s map cells whose patch touches tissue (see
    :func:`rois_cells_on_tissue`, which does every ROI of a plan at once)."""
    return rois_cells_on_tissue(g, tissue, scan_ds, [roi])[(roi.row, roi.col)]


def rois_cells_on_tissue(g, tissue: TissueMask, scan_ds: float, rois: list) -> Dict[Tuple[int, int], np.ndarray]:
    """:func:`cells_on_tissue` of every ROI, by (row, col): one summed-area lookup per row of
    ROIs (the columns of that row's ROIs side by side) instead of one per ROI (an 80k px
    slide with a disc of tissue, 29,205 ROIs: 1.69 -> 0.82 s; bench_scan's 196: 11 -> 5.5 ms).
    The same boxes, so the same answers (each ROI's mask is a view into its row's)."""
    step, side = g.step * scan_ds, g.patch * scan_ds
    by_row: Dict[Tuple[int, int], list] = {}
    for r in rois:
        by_row.setdefault((r.row, r.rows), []).append(r)
    out = {}
    for (row, rows), rs in by_row.items():
        cols = np.concatenate([r.col + np.arange(r.cols) for r in rs])
        hit = tissue.boxes_touching(cols * step, (row + np.arange(rows)) * step, side)
        at = 0
        for r in rs:
            out[(r.row, r.col)] = hit[:, at:at + r.cols]
            at += r.cols
    return out


def least_work_roi_outputs(g, n_rows: int, n_cols: int, largest: int, tissue: TissueMask, scan_ds: float) -> int:
    """L_m' for roi_outputs="auto": among the sizes that fit the memory budget (up to
    ``largest``), the one whose tissue ROIs compute the fewest input pixels, halo and glass
    included (ties: the larger). Smaller ROIs hug the tissue (less glass) but each carries
    a halo of patch - step pixels; sizes below largest / 4 are not tried (per-call costs the
    input count does not see). Each size's ROI grid is tested against the tissue mask with
    one summed-area lookup per ROI (:meth:`TissueMask.boxes_touching`)."""
    best, best_cost = largest, None
    for L in sorted({max(1, int(round(largest * 0.25 ** (k / 10)))) for k in range(11)}, reverse=True):
        na, nb = math.ceil(n_rows / L), math.ceil(n_cols / L)
        rows = np.minimum(L, n_rows - np.arange(na) * L)
        cols = np.minimum(L, n_cols - np.arange(nb) * L)
        side_y = np.array([g.input_side(int(r)) for r in rows])
        side_x = np.array([g.input_side(int(c)) for c in cols])
        touched = tissue.boxes_touching(np.arange(nb) * L * g.step * scan_ds, np.arange(na) * L * g.step * scan_ds,
                                        g.input_side(L) * scan_ds)
        cost = int((touched * side_y[:, None] * side_x[None, :]).sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = L, cost
    return best


def plan_rois(g, n_rows: int, n_cols: int, L: int, tissue: TissueMask, scan_ds: float):
    """ROIs of L x L map cells at ROI stride L * step (paper Eq. 2), the last row and column
    cut to the map; only those whose input area touches tissue (:class:`Roi`, row-major).
    Returns (tissue ROIs, number of ROIs in the whole grid)."""
    n_a, n_b = math.ceil(n_rows / L), math.ceil(n_cols / L)
    rows = [min(L, n_rows - a * L) for a in range(n_a)]
    cols = [min(L, n_cols - b * L) for b in range(n_b)]
    ys, xs = [a * L * g.step for a in range(n_a)], [b * L * g.step for b in range(n_b)]
    his, wis = [g.input_side(r) for r in rows], [g.input_side(c) for c in cols]
    # one summed-area lookup for the whole grid (the same test as TissueMask.any_in per ROI)
    hit = tissue.any_in_grid(np.multiply(xs, scan_ds), np.multiply(np.add(xs, wis), scan_ds),
                             np.multiply(ys, scan_ds), np.multiply(np.add(ys, his), scan_ds))
    rois = [Roi(a * L, b * L, rows[a], cols[b], xs[b], ys[a], wis[b], his[a])
            for a, b in zip(*(v.tolist() for v in np.nonzero(hit)))]
    return rois, n_a * n_b


MAX_REGION_BYTES = 1 << 30  # the most one ROI may read from its level before resampling


def read_scan_region(s: Slide, x: int, y: int, w: int, h: int, scan_ds: float, level: int,
                      level_ds: float) -> np.ndarray:
    """RGB (h, w, 3) uint8: the scan-level pixels [x, x + w) x [y, y + h), each the same
    whichever ROI reads it. At a level's own resolution (``open_scan`` sets ``scan_ds`` to
    the level's downsample when they agree within 0.1%) they are the level's pixels as
    stored (:meth:`Slide.read_level`); otherwise the level is resampled with weights that
    depend only on the pixel's position on the slide (:func:`resample_weights`)."""
    factor = scan_ds / level_ds
    if factor == 1.0:
        return s.read_level(x, y, w, h, level)
    (ix, wx), (iy, wy) = resample_weights(x, w, factor), resample_weights(y, h, factor)
    lx0, ly0 = int(ix.min()), int(iy.min())
    lw, lh = int(ix.max()) + 1 - lx0, int(iy.max()) + 1 - ly0
    if lw * lh * 4 > MAX_REGION_BYTES:
        from ..slide.reader import SlideError

        raise SlideError(f"{s.name}: no level of the slide is near the scan resolution: a {w} x {h} px ROI would "
                         f"read {lw} x {lh} px of level {level} ({lw * lh * 4 / 2**30:.1f} GiB); scan at a finer "
                         "resolution or give the slide a pyramid")
    img = s.read_level(lx0, ly0, lw, lh, level).astype(np.float32)
    cols = np.zeros((lh, w, 3), dtype=np.float32)
    for k in range(ix.shape[1]):  # a fixed order of taps: each output pixel is the same sum in every ROI
        cols += wx[None, :, k, None] * img[:, ix[:, k] - lx0]
    out = np.zeros((h, w, 3), dtype=np.float32)
    for k in range(iy.shape[1]):
        out += wy[:, k, None, None] * cols[iy[:, k] - ly0]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resample_weights(p0: int, n: int, factor: float) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (n, K): the level pixels and float32 weights of scan pixels
    p0 .. p0 + n - 1 on one axis, when a scan pixel is ``factor`` level pixels. Scan pixel p
    is centred at level coordinate u = (p + 1/2) * factor - 1/2; the filter is the triangle
    of half-width max(factor, 1) (bilinear, antialiased when shrinking, as PyTorch's
    ``antialias=True``), normalised over its taps. Pixels beyond the level are white (what
    reading there gives), so the weights depend on p alone, never on the ROI."""
    support = max(factor, 1.0)
    K = 2 * math.ceil(support) + 1
    u = (np.arange(p0, p0 + n, dtype=np.float64) + 0.5) * factor - 0.5
    first = np.floor(u - support).astype(np.int64) + 1
    idx = first[:, None] + np.arange(K)
    w = np.maximum(0.0, 1.0 - np.abs(idx - u[:, None]) / support)
    return idx, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def component_maxima(values: np.ndarray, labels: np.ndarray, which=None) -> List[Tuple[float, int, int]]:
    """(maximum, row, col) of each label in ``which`` (default: all, 1..max), in that
    order: the first maximum in raster order (scipy's maximum_position does not promise
    which of equal maxima it returns)."""
    flat = np.flatnonzero(labels)
    labs, vals = labels.ravel()[flat], values.ravel()[flat]
    order = np.lexsort((flat, -vals, labs))  # by label, then value descending, then raster order
    first = order[np.r_[True, labs[order][1:] != labs[order][:-1]]] if len(order) else order
    best = {int(labs[k]): (float(vals[k]), *divmod(int(flat[k]), labels.shape[1])) for k in first}
    keys = range(1, int(labels.max(initial=0)) + 1) if which is None else which
    return [best[int(k)] for k in keys if int(k) in best]
