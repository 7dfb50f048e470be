"""Writing files so that an interrupted run never leaves a half-written one: write a
temporary file in the same folder, then os.replace it into place."""
import json
import os
import tempfile
import threading
from typing import Callable

from ..errors import InvalidArgumentError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by
    setting and restoring it under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every system opens folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a temporary path next to ``path``, flush it to disk (fsync),
    then move it into place and sync the folder; on any failure the temporary file is
    removed and ``path`` is untouched. The file gets the mode a plain open() would give
    (0666 less the umask: 0644 under the usual 022), not mkstemp's 0600."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
    return path


def write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str, obj, indent=None) -> str:
    return write_text(path, json.dumps(obj, indent=indent))


def prepare_folder(folder: str) -> str:
    """Create ``folder`` and check it is writable, with an error naming it if not."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"output folder {folder} is not writable")
    return folder


STATUS = "status.json"  # in each slide's output folder: which slide, which job, running / failed / done


def write_status(folder: str, state: str, **fields) -> str:
    """Record the state of the slide job writing ``folder`` (atomically): "running" while
    it works, "failed" with the reason, "done" once report.json is written. A folder whose
    status is not "done" holds nothing complete."""
    return write_json(os.path.join(folder, STATUS), {"state": state, **fields}, indent=2)


def read_status(folder: str):
    """The folder's status record, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, STATUS), encoding="utf-8") as f:
            obj = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# What slide jobs write into a slide's folder: a folder holding any of these holds results.
RESULT_FILES = ("report.json", "heatmap.tif", "overlay.png", "detections.csv", "camelyon16_submission.csv",
                "detections.geojson", "detections.xml", "heatmap_contours.geojson", "heatmap_contours.xml",
                "mitoses.csv", "mitoses.geojson", "hotspot.png")
LOCK = ".pyfastscan.lock"
COHORT_CSV, COHORT_EVENTS = "cohort.csv", "cohort.jsonl"  # what pyfastscan cohort writes beside the slide folders


class OutputFolderError(InvalidArgumentError):
    """An output folder cannot be used: taken by another run, or holding other results."""


def slide_folders(out: str, slides, per_slide: bool = True):
    """The output folder of each slide: ``out`` itself for a single slide unless
    ``per_slide``, else out/<the slide's path relative to the common folder of all the
    slides, without its extension> (a/slide.svs and b/slide.tif go to out/a/slide and
    out/b/slide). Two slides that would share a folder are refused."""
    if not per_slide and len(slides) == 1:
        return [out]
    paths = [os.path.abspath(os.fspath(p)) for p in slides]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    folders, seen = [], {}
    for slide, p in zip(slides, paths):
        folder = os.path.join(out, os.path.splitext(os.path.relpath(p, root))[0])
        key = os.path.normcase(os.path.normpath(folder))
        if key in seen:
            raise OutputFolderError(f"{seen[key]} and {slide} would both write to {folder}: give each slide once, "
                                    "or scan them into different --out folders")
        seen[key] = slide
        folders.append(folder)
    return folders


class FolderLock:
    """An exclusive lock on an output folder (flock on its .pyfastscan.lock) for as long as
    a slide job writes there; a second writer is refused at once, never made to wait. The
    operating system releases it when the process ends, however it ends."""

    def __init__(self, folder: str):
        self.folder, self._f = folder, None

    def __enter__(self):
        if self._f is not None:  # already held (claim_folder returns it locked)
            return self
        path = os.path.join(self.folder, LOCK)
        f = open(path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            self._f = f
            return self
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read(200).strip()
            f.close()
            raise OutputFolderError(f"output folder {self.folder} is in use by another pyfastscan run"
                                    f"{' (' + who + ')' if who else ''}; wait for it to finish or choose another "
                                    "--out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.close()  # releases the flock
            self._f = None
        return False


def claim_folder(folder: str, slide: str, job: str, overwrite: bool = False) -> FolderLock:
    """Make ``folder``, lock it (:class:`FolderLock`, returned locked: use it in a with
    block) and check it may receive ``slide``'s results: a folder holding results of
    another slide, or complete results of an earlier run, is refused unless ``overwrite``.
    A folder this slide's interrupted or failed run left (status not "done") is reused.
    The folder's report.json is removed before any work starts, so until the new one is
    written nothing in it passes for complete."""
    prepare_folder(folder)
    lock = FolderLock(folder).__enter__()
    try:
        status = read_status(folder)
        present = [f for f in RESULT_FILES if os.path.exists(os.path.join(folder, f))]
        slide = os.path.abspath(slide)
        if status is not None and status.get("slide") not in (None, slide):
            why = f"holds the results of another slide ({status.get('slide')})"
        elif present and (status is None or status.get("state") == "done"):
            why = f"holds the results of an earlier run ({', '.join(present[:3])}{' ...' if len(present) > 3 else ''})"
        else:
            why = None
        if why and not overwrite:
            raise OutputFolderError(f"output folder {folder} {why}; pass --overwrite to replace them, or choose "
                                    "another --out")
        report = os.path.join(folder, "report.json")
        if os.path.exists(report):
            os.remove(report)
        write_status(folder, "running", slide=slide, job=job, pid=os.getpid())
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return lock


def mark_failed(folder: str, slide: str, job: str, reason: str) -> None:
    """Leave ``folder`` marked failed: status "failed" with the reason, no report.json (a
    report from a previous run of this folder would otherwise look like this run's)."""
    try:
        report = os.path.join(folder, "report.json")
        if os.path.exists(report):
            os.remove(report)
        write_status(folder, "failed", slide=os.path.abspath(slide), job=job, reason=reason)
    except OSError:
        pass  # the folder itself is what failed: nothing can be marked in it


def work_in_folder(folder: str, slide: str, job: str, work: Callable, *, overwrite: bool = False):
    """``work()`` with ``folder`` claimed for ``slide`` (:func:`claim_folder`: an unwritable,
    locked or already used folder fails before the work, not after it). Done: the folder's
    status is "done" and work's result is returned. Any failure: the folder is marked
    failed with the one-line reason (:func:`~pyfastscan.errors.failure_reason`, kept on the
    exception as ``pyfastscan_reason``) while it is still locked, and the exception goes on."""
    from ..errors import failure_reason

    with claim_folder(folder, slide, job, overwrite=overwrite):
        try:
            result = work()
            write_status(folder, "done", slide=os.path.abspath(slide), job=job)
            return result
        except BaseException as exc:
            exc.pyfastscan_reason = failure_reason(exc, folder, f"{job} {slide}")
            mark_failed(folder, slide, job, exc.pyfastscan_reason[0])
            raise
