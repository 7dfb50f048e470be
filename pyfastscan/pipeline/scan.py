"""Whole-slide dense scanning, the heat-map job (Fast ScanNet Section II-C, DESIGN.md 2.4).

    result = pyfastscan.scan_slide("slide.svs", model, alpha=2)
    result.save("out/slide")      # heatmap.tif, overlay.png, detections.csv/.geojson, report.json, ...

It runs the scan engine (:mod:`pyfastscan.pipeline.engine`: open, tissue, ROI plan, input
pipeline, inference), stitches the ROI maps into the whole-slide map, keeps the checkpoint,
and post-processes the map into detections.
"""
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from torch import nn

from ..errors import InvalidArgumentError
from ..validate import check, check_optional
from .engine import Detection, SlideRun, component_maxima, infer_rois, open_scan, scan_key

CHECKPOINT = ".pyfastscan-scan.ckpt"  # in a slide's output folder while its scan runs (scan_to_folder)
ENGINES = ("local", "ray")

@dataclass
class ScanResult(SlideRun):
    """Everything a scan produced. heatmap[i, j] is the probability of the patch centred at
    (origin_px[0] + j * stride_px, origin_px[1] + i * stride_px) in level-0 pixels."""

    heatmap: np.ndarray
    stride_px: float
    origin_px: Tuple[float, float]
    detections: List[Detection]
    score: float
    scan_mpp: float
    n_rois_resumed: int = 0
    threshold: float = 0.5

    def save(self, folder, command: Optional[str] = None, heatmap_dtype: str = "uint8",
             truth=None, extra: Optional[dict] = None) -> Dict[str, str]:
        """Write heatmap.tif (``heatmap_dtype`` "uint8" or "float32"; on the slide's grid,
        see pipeline/outputs.py viewer_grid), overlay.png, detections.csv,
        camelyon16_submission.csv, detections.geojson / .xml, heatmap_contours.geojson /
        .xml and report.json (with the entries of ``extra`` added) into ``folder``
        (created), each atomically. ``truth``: ground truth annotations (e.g.
        ``pyfastscan.io.read_annotations(path)``) outlined in overlay.png. Returns name -> path."""
        from .outputs import save_result

        return save_result(self, folder, command, heatmap_dtype, truth, extra)


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`, else InvalidArgumentError."""
    if engine not in ENGINES:
        raise InvalidArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


def scan_slide(slide, model: nn.Module, *, alpha: Optional[int] = None, mpp: Optional[float] = None, device="cpu",
               precision: str = "auto", plan: Optional[str] = None, mode: str = "auto", patch: Optional[int] = None,
               stride: Optional[int] = None, normalize=None, batch_size: Optional[int] = None,
               tissue_mask=None, tissue_labels=None, roi_outputs="auto", memory: Optional[int] = None,
               positive_class: Optional[int] = None, threshold: float = 0.5, readers: Optional[int] = None,
               checkpoint: Optional[str] = None, resume: bool = False, progress: bool = True,
               scan_mpp: Optional[float] = None, slide_mpp: Optional[float] = None,
               model_mpp: Optional[float] = None, engine: str = "local", workers: Optional[int] = None,
               address: Optional[str] = None, scanners: Optional[dict] = None) -> ScanResult:
    """Whole-slide scan with any patch classifier: dense when it is padding-free, patch by
    patch otherwise, the same map either way (DESIGN.md 6.2).

    Args:
        slide: a path (OpenSlide) or an object with OpenSlide's reading interface, or an
            opened :class:`pyfastscan.slide.Slide`.
        model: the patch classifier: ``pyfastscan.load_model``'s (its weights file says how
            to scan it), any ``nn.Module``, or a DenseModel / PatchModel. Input is RGB
            scaled to [0, 1] (then ``normalize``); its output channels are logits (a
            softmax is applied) unless its last layer is a Softmax. Not modified.
        alpha: dense factor; the map's step is S_p / alpha pixels at the scan level
            (default 2; a DenseModel's own).
        mpp: deprecated, both ``scan_mpp`` and ``slide_mpp`` at once (what it meant before
            they existed).
        scan_mpp: the resolution to scan at, um/px (default: ``model_mpp``, else the
            slide's level 0).
        slide_mpp: level-0 um/px of a slide that has no resolution of its own.
        model_mpp: the resolution the model was trained at (default: what its weights file
            says); a scan resolution more than 10% away from it warns.
        device, plan: where and how the model runs (see to_dense; plan default "minimal", a
            DenseModel's own).
        precision: "auto" (bf16 on an AMX CPU or a CUDA device of compute capability 8.0+,
            else fp32; see pyfastscan.precision), "fp32" (true fp32, also on CUDA), "tf32"
            (CUDA's TF32 convolutions) or "bf16". report.json records what ran and why.
        mode: "auto" (dense when the network converts, else patch mode, with one line
            saying why), "dense" or "patch".
        patch, stride: patch mode's patch side and grid stride at alpha 1 (default: the
            weights file's); the step is stride / alpha.
        normalize: (mean, std) per channel of the [0, 1] input (default: the weights
            file's); folded into the first convolution in dense mode.
        batch_size: patches per batch in patch mode (default: from ``memory``).
        tissue_mask: None (Otsu on a thumbnail), or a mask image at any downsample
            (nonzero = tissue, or label values in ``tissue_labels``).
        roi_outputs: L_m', map cells per ROI side, or "auto": the largest (up to 256) whose
            activations fit ``memory`` bytes (default :func:`memory_budget` of the device).
        memory: the byte budget for roi_outputs="auto".
        positive_class: the output channel the map shows (default: the weights file's, else 1).
        threshold: probability for detections (paper: 0.5).
        readers: reader threads decoding ROIs ahead of the model (default: one per core, at
            least 2, at most 8; CLI ``--readers``).
        checkpoint: a file where each finished ROI is appended as soon as it is computed.
        resume: continue from ``checkpoint``: the ROIs it holds are not read or computed
            again. It must come from a scan of the same slide with the same model and
            parameters (checked). Without resume, the checkpoint starts empty.
        progress: a progress line on stderr.
        engine: "local" (this process) or "ray": this process plans the ROIs, stitches and
            keeps the checkpoint, ``workers`` Ray actors (:mod:`pyfastscan.pipeline.distributed`)
            each open the slide themselves and compute batches of ROIs. The map is the local
            map, bit for bit (same backend and precision). Needs ``pip install "pyfastscan[ray]"``;
            ``slide`` must then be a path (or a picklable reader object).
        workers: Ray actors for engine="ray" (default: one per GPU of the cluster, else 2).
        address: the Ray cluster for engine="ray": None starts a local instance (bound to
            127.0.0.1) unless Ray is already initialised in this process; "auto" or
            "HOST:PORT" joins a running one (``ray start --head``).
        scanners: a dict kept between calls in which the converted model is cached (a
            cohort's worker passes one, so it builds its dense model once).
    """
    check("threshold", threshold)
    check_optional("positive_class", positive_class)
    check_engine(engine)
    if engine == "local" and workers is not None:
        raise InvalidArgumentError(f"workers={workers!r} is for engine='ray' (Ray actors); the local engine's reader "
                                   "threads are readers=")
    workers = check_optional("workers", workers)
    options = dict(alpha=alpha, mpp=mpp, device=device, precision=precision, plan=plan, tissue_mask=tissue_mask,
                   tissue_labels=tissue_labels, roi_outputs=roi_outputs, memory=memory, readers=readers, mode=mode,
                   patch=patch, stride=stride, normalize=normalize, batch_size=batch_size,
                   positive_class=positive_class, scan_mpp=scan_mpp, slide_mpp=slide_mpp, model_mpp=model_mpp)
    with contextlib.ExitStack() as stack:
        job = open_scan(stack, slide, model, progress=progress, scanners=scanners, **options)
        s, rois, timings = job.slide, job.rois, job.timings
        heat = np.zeros((job.n_rows, job.n_cols), dtype=np.float32)  # pages never written stay unallocated
        log = None
        if checkpoint is not None:
            from .checkpoint import RoiLog

            log = RoiLog(os.fspath(checkpoint), scan_key(job), resume)
            stack.callback(log.close)
            log.restore(heat)
            finished = log.done()
            todo = [r for r in rois if (r[0], r[1]) not in finished]
        elif resume:
            raise InvalidArgumentError("resume needs the checkpoint file to resume from")
        else:
            todo = rois
        n_resumed = len(rois) - len(todo)
        label = f"scan {s.name}" + (f" (resuming: {n_resumed} ROIs done before)" if n_resumed else "")
        if engine == "ray":
            from .distributed import infer_rois_ray

            # the workers plan exactly the driver's ROIs in the driver's precision, whatever their machine
            options.update(roi_outputs=job.roi_outputs, precision=job.precision)
            stream = infer_rois_ray(job, todo, slide, model, options, workers=workers, address=address, label=label,
                                    progress=progress)
        else:
            stream = infer_rois(job, todo, device=device, readers=readers, label=label, progress=progress)
        for (r0, c0, rows, cols, *_), block in stream:
            heat[r0:r0 + rows, c0:c0 + cols] = block
            if log is not None:
                log.append(r0, c0, block)

        t = time.perf_counter()
        stride_px, origin = job.stride_px, job.origin_px
        detections = []
        if rois:  # outside the tissue ROIs' bounding box (+2 zero cells) the map is 0: no detections
            r0 = max(0, min(r[0] for r in rois) - 2)
            c0 = max(0, min(r[1] for r in rois) - 2)
            r1 = min(job.n_rows, max(r[0] + r[2] for r in rois) + 2)
            c1 = min(job.n_cols, max(r[1] + r[3] for r in rois) + 2)
            detections = postprocess(heat[r0:r1, c0:c1], stride_px,
                                     (origin[0] + c0 * stride_px, origin[1] + r0 * stride_px), threshold)
        timings["postprocess"] = time.perf_counter() - t
        return ScanResult(**job.run_info(), heatmap=heat, stride_px=stride_px, origin_px=origin,
                          detections=detections, score=float(heat.max()), scan_mpp=job.scan_mpp,
                          n_rois_resumed=n_resumed, threshold=threshold)


def postprocess(heat: np.ndarray, stride_px: float, origin_px: Tuple[float, float],
                threshold: float = 0.5) -> List[Detection]:
    """Fast ScanNet post-processing: opening (3x3) of the map, threshold, connected
    components; each component is a detection at its maximum probability (the first in
    raster order among equal maxima)."""
    from scipy import ndimage

    opened = ndimage.grey_opening(heat, size=(3, 3))
    labels, n = ndimage.label(opened > threshold)
    dets = [Detection(p, origin_px[0] + j * stride_px, origin_px[1] + i * stride_px)
            for p, i, j in component_maxima(heat, labels)]
    return sorted(dets, key=lambda d: -d.probability)


def slide_job(path: str, folder: str, job: str, run, *, default_mpp: Optional[float], overwrite: bool):
    """``run(slide)`` for the slide at ``path``, in ``folder`` claimed for ``job``
    (:func:`~pyfastscan.io.files.work_in_folder`: marked running, then done or failed).
    The slide is opened first, so a bad slide fails before any folder is made, and closed
    after. The one way the CLI's slide commands and the cohort's engines run a slide."""
    from ..io.files import work_in_folder
    from ..slide import open_slide

    slide = open_slide(path, default_mpp=default_mpp)
    try:
        return work_in_folder(folder, path, job, lambda: run(slide), overwrite=overwrite)
    finally:
        slide.close()


def slide_job_failure(exc: BaseException, path: str, out: str, job: str) -> Tuple[str, bool]:
    """(reason, is a bug) of ``exc`` from :func:`slide_job`, for a line that names the slide
    once (a slide error's reason starts with its path: it is dropped there)."""
    from ..errors import failure_reason

    reason, bug = getattr(exc, "pyfastscan_reason", None) or failure_reason(exc, out, f"{job} {path}")
    return (reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason), bug


def scan_to_folder(slide, folder: str, model: nn.Module, *, resume: bool = True, command: Optional[str] = None,
                   heatmap_dtype: str = "uint8", report_extra: Optional[dict] = None, truth=None,
                   **options) -> ScanResult:
    """:func:`scan_slide` into ``folder`` (``pyfastscan scan``'s unit of work): each finished
    ROI goes to ``folder``/CHECKPOINT as soon as it is computed, the outputs are written
    (:meth:`ScanResult.save`, with ``report_extra`` in report.json and ``truth`` outlined in
    overlay.png), then the checkpoint is
    removed. With ``resume``, a checkpoint an interrupted run left there is continued (it
    must belong to the same scan: checked). ``options`` go to :func:`scan_slide`."""
    ckpt = os.path.join(folder, CHECKPOINT)
    res = scan_slide(slide, model, checkpoint=ckpt, resume=resume and os.path.exists(ckpt), **options)
    res.save(folder, command=command, heatmap_dtype=heatmap_dtype, truth=truth, extra=report_extra)
    os.remove(ckpt)  # the outputs are complete: nothing left to resume
    return res
