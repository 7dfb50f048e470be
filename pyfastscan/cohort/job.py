"""The cohort job: :func:`scan_cohort` plans the cohort (folders, run keys, what an earlier
run finished) with :mod:`pyfastscan.cohort.run` and hands the slides left to an engine:
``run_local`` there, or :mod:`pyfastscan.cohort.ray_engine` (which builds on run.py, so
run.py never imports it)."""
import os
from typing import Optional

from ..errors import InvalidArgumentError
from ..io.files import slide_folders
from ..pipeline.scan import check_engine
from ..validate import check, check_optional
from .run import CohortResult, Ledger, SlideRecord, finished_report, model_digest, run_key, run_local


def scan_cohort(slides, model, out: str, *, engine: str = "local", address: Optional[str] = None,
                workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
                cpus_per_worker: Optional[float] = None, retries: int = 2, resume: bool = True,
                overwrite: bool = False, progress: bool = True, command: Optional[str] = None,
                heatmap_dtype: str = "uint8", **scan_options) -> CohortResult:
    """Scan every slide of ``slides`` into its own folder under ``out``.

    Args:
        slides: slide paths (two with the same file name in different folders get
            different output folders).
        model: the classifier, as for :func:`~pyfastscan.scan_slide`.
        out: the cohort folder (on a cluster, a file system every worker shares).
        engine: "local" (this process, one slide after another) or "ray" (see
            :mod:`pyfastscan.cohort.ray_engine`; ``pip install "pyfastscan[ray]"``).
        address: the Ray cluster: None starts a local instance bound to 127.0.0.1 (unless
            Ray is initialised in this process already), "auto" or "HOST:PORT" joins one.
        workers: Ray workers (default: GPUs / ``gpus_per_worker``, or one per node without
            GPUs).
        gpus_per_worker: GPUs each Ray worker holds (default 1 when the cluster has GPUs,
            else 0; 0.5 puts two workers on each GPU).
        cpus_per_worker: CPUs each Ray worker holds for Ray's scheduling (default: the
            cluster's CPUs shared among the workers). A worker runs as many torch threads as
            this process (``torch.set_num_threads``; CLI ``--threads``): oneDNN's sums, so a
            map's last bits, depend on the thread count, and so the maps are those this
            process would compute.
        retries: attempts after the first for a slide that fails with an error another
            attempt may cure (its worker lost, an I/O or read error); each resumes from the
            slide's checkpoint. Bad options, unusable output folders and bugs are not retried.
        resume: continue slides an interrupted run left half done from their checkpoints
            (retries always do); False starts them over.
        overwrite: replace results an earlier run with another run key left in a folder
            (refused otherwise, the slide recorded as failed).
        progress: the cohort's progress line on stderr (slides done, failed, ETA).
        command: the command line recorded in each report.json (default: sys.argv).
        heatmap_dtype: "uint8" or "float32" heatmap.tif.
        scan_options: every other option of :func:`~pyfastscan.scan_slide` (alpha, device,
            precision, roi_outputs, ...), the same for every slide.

    Returns:
        :class:`CohortResult`: one :class:`SlideRecord` per slide, in the order given.
    """
    check_engine(engine)
    retries = check("retries", retries)
    workers = check_optional("workers", workers)
    gpus_per_worker = check_optional("gpus_per_worker", gpus_per_worker)
    cpus_per_worker = check_optional("cpus_per_worker", cpus_per_worker)
    if engine == "local" and (workers, address, gpus_per_worker, cpus_per_worker) != (None,) * 4:
        raise InvalidArgumentError("workers, address, gpus_per_worker and cpus_per_worker are for engine='ray'")
    bad = sorted(set(scan_options) & {"checkpoint", "engine", "scanners"})
    if bad:
        raise InvalidArgumentError(f"scan_cohort keeps each slide's checkpoint and runs its own engine: do not pass "
                                   f"{', '.join(bad)}")
    slides = [os.fspath(s) for s in slides]
    if not slides:
        raise InvalidArgumentError("the cohort has no slides")
    folders = slide_folders(os.fspath(out), slides, per_slide=True)
    options = dict(scan_options, heatmap_dtype=heatmap_dtype)
    ident = model_digest(model)
    records = []
    for path, folder in zip(slides, folders):
        try:
            key = run_key(path, ident, options)
        except OSError as exc:
            records.append(SlideRecord(path, folder, {}, status="failed", error=f"cannot read it: {exc.strerror}"))
            continue
        records.append(SlideRecord(path, folder, key))
    os.makedirs(out, exist_ok=True)
    ledger = Ledger(os.fspath(out), records, retries, progress)
    for rec in records:
        report = finished_report(rec.folder, rec.key) if rec.status == "pending" else None
        if report is not None:
            rec.status, rec.score, rec.detections = "skipped", report.get("score"), report.get("n_detections")
            rec.tissue_cells = (report.get("cells") or {}).get("tissue")
    todo = [r for r in records if r.status == "pending"]
    ledger.event("run", engine=engine, slides=len(records), todo=len(todo), skipped=len(records) - len(todo))
    for rec in records:
        if rec.status == "skipped":
            ledger.event("skip", rec, reason="done by an earlier run with the same run key")
        elif rec.status == "failed":
            ledger.event("fail", rec, attempts=0, error=rec.error)
    ledger.write_csv()
    work = dict(model=model, resume=resume, overwrite=overwrite, command=command, heatmap_dtype=heatmap_dtype,
                options=scan_options)
    if engine == "local":
        run_local(todo, ledger, work)
    else:
        from .ray_engine import run_ray

        run_ray(todo, ledger, work, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                cpus_per_worker=cpus_per_worker)
    return CohortResult(os.fspath(out), records)
