"""Scanning a cohort of slides: each into its own folder, finished slides skipped on a
re-run, slides whose worker was lost retried from their checkpoint, failures recorded
and the cohort going on (issue 16).

    result = scan_cohort(["a/s1.svs", "b/s1.svs", "b/s2.tif"], model, "out", engine="ray")  # cohort/job.py
    result.exit_status      # 0 every slide done (or skipped), 1 some failed

Folders: out/<the slide's path relative to the common folder of the inputs, without its
extension>/ (:func:`~pyfastscan.io.files.slide_folders`), each holding what
``pyfastscan scan`` writes. A slide is done when its folder's report.json carries the
same run key (:func:`run_key`: the slide file, the model's weights and card, every option
that changes the outputs). ``out/cohort.csv`` has one row per slide and ``out/cohort.jsonl``
one event per line (run, skip, start, finish, retry, fail), both rewritten atomically
after every event, so a killed driver leaves them consistent.

Engines: "local" scans the slides one after another in this process; "ray" keeps one
long-lived worker per GPU (or per CPU share) that converts the model once and scans
whole slides (:mod:`pyfastscan.cohort.ray_engine`).
"""
import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

from ..errors import InvalidArgumentError
from ..io.files import COHORT_CSV, COHORT_EVENTS, write_text

COLUMNS = ("slide", "status", "score", "detections", "tissue_cells", "seconds", "worker", "error")
JOB = "cohort"
# scan options that change how fast, not what: left out of the run key
SPEED_OPTIONS = ("progress", "readers", "batch_size")  # engine, scanners and checkpoint are refused (job.py)


@dataclass
class SlideRecord:
    """One slide of the cohort: where it goes and how it went.

    ``status`` is "pending", "done", "skipped" (done by an earlier run with the same run
    key: its score and detections are that run's), or "failed" (``error`` says why)."""

    slide: str
    folder: str
    key: dict = field(repr=False)
    status: str = "pending"
    score: Optional[float] = None
    detections: Optional[int] = None
    tissue_cells: Optional[int] = None
    seconds: Optional[float] = None
    worker: str = ""
    error: str = ""
    attempts: int = 0
    rois_computed: Optional[int] = None  # in the attempt that finished
    rois_resumed: Optional[int] = None  # taken from the checkpoint by that attempt
    internal: bool = False  # the failure is a bug (traceback in the folder's pyfastscan-error.log)


@dataclass
class CohortResult:
    out: str
    records: List[SlideRecord]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def exit_status(self) -> int:
        """0 every slide done or skipped, 1 some failed."""
        return 1 if self.count("failed") else 0


def _plain(v):
    """A JSON value standing for option value ``v`` (arrays by their digest)."""
    import hashlib

    import numpy as np

    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, np.ndarray):
        a = np.ascontiguousarray(v)
        return f"array {a.dtype} {list(a.shape)} {hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()}"
    if hasattr(v, "__fspath__"):
        return os.fspath(v)
    return repr(v)


def model_digest(model) -> dict:
    """What identifies the model in a run key: its weights (names, shapes, dtypes, values)
    and the card of its weights file."""
    from ..models.files import card_of
    from ..pipeline.checkpoint import weights_digest

    card = card_of(model)
    return dict(weights=weights_digest(model), card=None if card is None else _plain(vars(card)))


def run_key(slide: str, model_id: dict, options: dict) -> dict:
    """The run key of a slide: its file (absolute path, size, modification time), the model
    (:func:`model_digest`) and every option that changes the outputs (JSON values)."""
    from .._version import __version__

    st = os.stat(slide)
    return dict(slide=os.path.abspath(slide), slide_bytes=st.st_size, slide_mtime_ns=st.st_mtime_ns, model=model_id,
                options={k: _plain(v) for k, v in sorted(options.items()) if k not in SPEED_OPTIONS},
                pyfastscan=__version__)


def finished_report(folder: str, key: dict) -> Optional[dict]:
    """The folder's report.json if it is complete (status "done") and from the same run
    key, else None."""
    from ..io.files import read_status

    status = read_status(folder)
    if status is None or status.get("state") != "done":
        return None
    try:
        with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
            report = json.loads(f.read(16 << 20))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("run_key") == key else None


def process_slide(path: str, folder: str, model, key: dict, *, resume: bool, overwrite: bool,
                  command: Optional[str], heatmap_dtype: str, worker: str, options: dict,
                  scanners: Optional[dict] = None) -> dict:
    """One attempt at one slide (the unit of work of both engines): open it, claim its
    folder (:func:`~pyfastscan.io.files.claim_folder`), scan it with its checkpoint there
    (:func:`~pyfastscan.pipeline.scan.scan_to_folder`, report.json carrying ``key``), mark
    it done; on an error mark the folder failed. Returns a plain dict (it crosses
    processes): status "done" with score, detections, tissue_cells, ROI counts, or
    "failed" with the error and whether another attempt may help (``retryable``: not for
    bad options or folders, nor for bugs)."""
    from ..pipeline.scan import scan_to_folder, slide_job, slide_job_failure

    t0 = time.perf_counter()
    base = dict(worker=worker, pid=os.getpid())
    try:
        res = slide_job(path, folder, JOB, lambda slide: scan_to_folder(
            slide, folder, model, resume=resume, command=command, heatmap_dtype=heatmap_dtype,
            report_extra={"run_key": key}, scanners=scanners, progress=False, **options),
            default_mpp=options.get("slide_mpp") or options.get("mpp"), overwrite=overwrite)
    except Exception as exc:
        reason, bug = slide_job_failure(exc, path, os.path.dirname(folder) or ".", JOB)
        return dict(base, status="failed", error=reason, internal=bug,
                    retryable=not bug and not isinstance(exc, InvalidArgumentError),
                    seconds=time.perf_counter() - t0)
    return dict(base, status="done", score=res.score, detections=len(res.detections), tissue_cells=res.cells["tissue"],
                rois=res.n_rois, rois_resumed=res.n_rois_resumed, rois_computed=res.n_rois - res.n_rois_resumed,
                seconds=time.perf_counter() - t0)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class Ledger:
    """The cohort's records, out/cohort.csv, out/cohort.jsonl (kept from earlier runs and
    added to) and the progress line (slides done, failed, ETA)."""

    def __init__(self, out: str, records: List[SlideRecord], retries: int, progress: bool):
        from ..progress import Progress

        self.out, self.records, self.retries = out, records, retries
        self.events_path = os.path.join(out, COHORT_EVENTS)
        self._mend_events()
        todo = sum(r.status == "pending" for r in records)
        self.bar = Progress(todo, "cohort", progress, unit="slides")
        self.settled = 0

    def _mend_events(self) -> None:
        """An earlier run's log is kept and added to; a last line a crash tore mid-write (not
        JSON) is dropped, once, the file rewritten whole (atomically), so that every line
        of the log parses."""
        try:
            with open(self.events_path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return
        lines = [ln for ln in text.splitlines() if ln.strip()]
        keep = lines[:-1] + [ln for ln in lines[-1:] if _is_json(ln)]
        if keep != lines or (text and not text.endswith("\n")):
            write_text(self.events_path, "".join(ln + "\n" for ln in keep))

    def event(self, kind: str, rec: Optional[SlideRecord] = None, **fields) -> None:
        """Append one JSON line and flush it to disk: a 10,000-slide cohort writes each event
        once, not the whole log again (which grows with the square of the events)."""
        entry = dict(time=round(time.time(), 3), event=kind, **({"slide": rec.slide} if rec else {}), **fields)
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_csv(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in self.records:
            w.writerow(["" if getattr(r, c) is None else (f"{r.seconds:.2f}" if c == "seconds" else getattr(r, c))
                        for c in COLUMNS])
        write_text(os.path.join(self.out, COHORT_CSV), buf.getvalue())

    def start(self, rec: SlideRecord, worker: str, pid: Optional[int]) -> None:
        rec.attempts += 1
        self.event("start", rec, attempt=rec.attempts, worker=worker, pid=pid, folder=rec.folder)

    def settle(self, rec: SlideRecord, result: dict) -> bool:
        """Record the outcome of an attempt; False when the slide goes back in the queue."""
        rec.worker = result.get("worker", rec.worker)
        if result["status"] == "done":
            rec.status, rec.error = "done", ""
            for k in ("score", "detections", "tissue_cells", "seconds", "rois_computed", "rois_resumed"):
                setattr(rec, k, result[k])
            self.event("finish", rec, attempt=rec.attempts, worker=rec.worker, score=rec.score,
                       detections=rec.detections, seconds=round(rec.seconds, 3), rois=result["rois"],
                       rois_computed=rec.rois_computed, rois_resumed=rec.rois_resumed)
        elif result.get("retryable") and rec.attempts <= self.retries:
            self.event("retry", rec, attempt=rec.attempts, worker=rec.worker, error=result["error"])
            return False
        else:
            rec.status, rec.error, rec.seconds = "failed", result["error"], result.get("seconds")
            rec.internal = bool(result.get("internal"))
            self.event("fail", rec, attempts=rec.attempts, worker=rec.worker, error=rec.error)
        self.settled += 1
        self.write_csv()
        failed = sum(r.status == "failed" for r in self.records)
        self.bar.update(self.settled, f"{failed} failed" if failed else "")
        return True


def run_local(todo: List[SlideRecord], ledger: Ledger, work: dict) -> None:
    """The local engine: slides one after another in this process, the model converted once."""
    scanners, worker = {}, f"local pid {os.getpid()}"
    for rec in todo:
        while True:
            ledger.start(rec, worker, os.getpid())
            result = attempt(rec, work, worker, scanners)
            if ledger.settle(rec, result):
                break


def attempt(rec: SlideRecord, work: dict, worker: str, scanners: Optional[dict]) -> dict:
    """:func:`process_slide` for the record's next attempt (a retry always resumes)."""
    return process_slide(rec.slide, rec.folder, work["model"], rec.key, resume=work["resume"] or rec.attempts > 1,
                         overwrite=work["overwrite"], command=work["command"], heatmap_dtype=work["heatmap_dtype"],
                         worker=worker, options=work["options"], scanners=scanners)
