"""Cohort scanning and one slide over many workers (issue 16), locally and on Ray.

The Ray tests share ONE local Ray instance for the session (2 CPUs, 2 fake GPUs so that
GPU pinning is exercised, bound to 127.0.0.1 only, no dashboard, no usage statistics);
workers take at most 0.5 CPU. Every test runs under an alarm, and faults are injected
from the test (a worker's process killed by its PID, the driver killed), never by
product code."""
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

from helpers import SlowDense
from test_hostile import _corrupt_tile, _slide, _tiled, _tissue

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("openslide")

from pyfastscan.cli import main  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
LIMIT_S = 150  # no test here may take longer than this


@pytest.fixture(autouse=True)
def time_limit():
    def expired(signum, frame):
        raise TimeoutError(f"test took more than {LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the test session, on 127.0.0.1 only."""
    from pyfastscan.pipeline.distributed import LOCAL_ONLY_ENV

    if "ray" not in sys.modules:  # Ray reads these when first imported
        for k, v in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(k, v)
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="pfs-ray-")  # short: Ray's socket paths must fit 107 bytes
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS + (os.pathsep + old if old else "")  # workers import tests/helpers.py
    try:
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp, log_to_driver=False)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    node = ray.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1", node["NodeManagerAddress"]
    yield ray
    ray.shutdown()


def _cohort_slides(root):
    """Three slides, two named s.tif in different folders."""
    (root / "a").mkdir(), (root / "b").mkdir()
    return [_slide(root / "a" / "s.tif", seed=1), _slide(root / "b" / "s.tif", seed=2),
            _slide(root / "b" / "t.tif", seed=3)]


def _heat(folder):
    return tifffile.imread(os.path.join(folder, "heatmap.tif"), key=0)


def _as_written(res):
    """heatmap.tif's float32 image of a ScanResult: its map placed on the slide's grid."""
    from pyfastscan.pipeline.outputs import place_on_grid, viewer_grid

    _, rows, cols, _ = viewer_grid(res.stride_px, res.origin_px, res.slide_size)
    return place_on_grid(res.heatmap, rows, cols, "float32")


def _rows(out):
    with open(os.path.join(out, "cohort.csv")) as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


def _events(out):
    with open(os.path.join(out, "cohort.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _last_run(events):
    k = max(i for i, e in enumerate(events) if e["event"] == "run")
    return events[k:]


ARGS = ("--arch", "tellez_cnn", "--alpha", "1", "--heatmap-float", "--quiet")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_cohort_equals_scan_per_slide_and_a_rerun_skips(tmp_path, weights, engine, request, capsys):
    extra = ()
    if engine == "ray":
        request.getfixturevalue("ray_session")
        extra = ("--engine", "ray", "--cpus-per-worker", "0.5")
    slides = _cohort_slides(tmp_path)
    out = tmp_path / "out"
    assert main(["cohort", *slides, "--weights", weights, "--out", str(out), *ARGS, *extra]) == 0
    folders = [out / "a" / "s", out / "b" / "s", out / "b" / "t"]
    rows = _rows(out)
    for path, folder in zip(slides, folders):
        single = tmp_path / "single" / os.path.relpath(path, tmp_path)
        assert main(["scan", path, "--weights", weights, "--out", str(single), *ARGS]) == 0
        a, b = _heat(folder), _heat(single)
        assert a.dtype == np.float32 and np.array_equal(a, b), f"{path}: cohort map != pyfastscan scan's"
        report = json.load(open(folder / "report.json"))
        assert report["slide"] == path and report["run_key"]["slide"] == path
        assert rows[path]["status"] == "done" and float(rows[path]["score"]) == report["score"]
        assert int(rows[path]["tissue_cells"]) == report["cells"]["tissue"] > 0
    if engine == "ray":  # one worker per fake GPU, each pinned to its own
        gpus = {r["worker"].split("GPU ")[1].rstrip(")") for r in rows.values()}
        assert gpus <= {"0", "1"} and all("GPU" in r["worker"] for r in rows.values())
        workers = [e for e in _events(out) if e["event"] == "workers"][-1]["workers"]
        assert sorted(w.split("GPU ")[1].rstrip(")") for w in workers) == ["0", "1"]
    stamps = [os.stat(f / "report.json").st_mtime_ns for f in folders]
    assert main(["cohort", *slides, "--weights", weights, "--out", str(out), *ARGS, *extra]) == 0
    last = _last_run(_events(out))
    assert [e["event"] for e in last] == ["run", "skip", "skip", "skip"], last
    assert [os.stat(f / "report.json").st_mtime_ns for f in folders] == stamps
    assert {r["status"] for r in _rows(out).values()} == {"skipped"}
    if engine == "local":  # the cohort folder is what evaluate reads
        labels = tmp_path / "labels.csv"
        labels.write_text("s,Tumor\nt,Normal\n")
        capsys.readouterr()
        status = main(["evaluate", "auc", "--pred", str(out / "b"), "--labels", str(labels)])
        assert status == 0, capsys.readouterr().err
        status = main(["evaluate", "auc", "--pred", str(out), "--labels", str(labels)])  # two slides named s
        assert status == 2 and "two predictions for slide 's'" in capsys.readouterr().err


def test_another_run_key_is_not_skipped(tmp_path, weights, capsys):
    slides = _cohort_slides(tmp_path)[:2]
    out = str(tmp_path / "out")
    assert main(["cohort", *slides, "--weights", weights, "--out", out, *ARGS]) == 0
    # another alpha changes every map: the earlier results are neither skipped nor silently replaced
    assert main(["cohort", *slides, "--weights", weights, "--out", out, *ARGS[:2], "--alpha", "2", "--quiet"]) == 1
    assert all(r["status"] == "failed" and "--overwrite" in r["error"] for r in _rows(out).values())
    assert main(["cohort", *slides, "--weights", weights, "--out", out, *ARGS[:2], "--alpha", "2", "--quiet",
                 "--overwrite"]) == 0
    assert {r["status"] for r in _rows(out).values()} == {"done"}
    assert json.load(open(os.path.join(out, "a", "s", "report.json")))["model_geometry"]["alpha"] == 2


def _slow_model(delay):
    from pyfastscan.dense import to_dense
    from pyfastscan.models import tellez_cnn

    torch.manual_seed(0)
    return SlowDense(to_dense(tellez_cnn().eval(), 1), delay)


def _records(path):
    """Whole ROI records in a checkpoint so far (pipeline/checkpoint.py's layout)."""
    import struct

    try:
        data = open(path, "rb").read()
    except OSError:
        return 0
    pos, n = data.find(b"\n") + 1, 0
    while pos and pos + 20 <= len(data):
        _, _, rows, cols, _ = struct.unpack_from("<4iI", data, pos)
        pos += 20 + rows * cols * 4
        n += pos <= len(data)
    return n


def test_a_killed_worker_resumes_its_slide_from_the_checkpoint(tmp_path, ray_session):
    from pyfastscan import scan_slide
    from pyfastscan.cohort import scan_cohort

    big = _tiled(tmp_path / "big.tif", _tissue(h=220, w=220, seed=4))  # 36 ROIs of 5 x 5 cells
    small = _slide(tmp_path / "small.tif", seed=5)
    model = _slow_model(0.08)
    kw = dict(alpha=1, roi_outputs=5, heatmap_dtype="float32")
    out = str(tmp_path / "out")
    done = {}
    run = threading.Thread(target=lambda: done.update(res=scan_cohort(
        [big, small], model, out, engine="ray", cpus_per_worker=0.5, progress=False, **kw)))
    run.start()
    ckpt = os.path.join(out, "big", ".pyfastscan-scan.ckpt")
    deadline = time.monotonic() + 90
    pid = None
    while time.monotonic() < deadline and run.is_alive():
        if pid is None and os.path.exists(os.path.join(out, "cohort.jsonl")):
            starts = [e for e in _events(out) if e["event"] == "start" and e["slide"] == big]
            pid = starts[0]["pid"] if starts else None
        if pid is not None and _records(ckpt) >= 4:
            break
        time.sleep(0.02)
    assert pid is not None and _records(ckpt) >= 4, "the slide never got under way"
    os.kill(pid, signal.SIGKILL)  # the worker's process, inside the slide
    at_kill = _records(ckpt)
    run.join(120)
    assert not run.is_alive()
    res = done["res"]
    assert res.exit_status == 0 and [r.status for r in res.records] == ["done", "done"]
    rec = res.records[0]
    total = json.load(open(os.path.join(out, "big", "report.json")))["rois_scanned"]
    assert at_kill < total, "the worker was killed after the slide had finished"
    assert rec.attempts == 2 and rec.rois_resumed >= at_kill and rec.rois_computed == total - rec.rois_resumed
    assert rec.rois_computed < total  # fewer ROIs computed the second time
    events = [e for e in _events(out) if e.get("slide") == big]
    assert [e["event"] for e in events] == ["start", "retry", "start", "finish"], events
    assert "lost" in events[1]["error"]
    assert events[2]["pid"] != pid  # restarted in a new process
    whole = scan_slide(big, _slow_model(0.0), progress=False, alpha=1, roi_outputs=5)
    got, want = _heat(os.path.join(out, "big")), _as_written(whole)
    assert np.array_equal(got, want), f"{np.argwhere(got != want)[:5]}"


def test_a_corrupt_slide_fails_after_the_retries_and_the_others_succeed(tmp_path, weights, ray_session, capsys):
    bad = _corrupt_tile(_slide(tmp_path / "bad.tif"), 3)
    good = [_slide(tmp_path / "g1.tif", seed=1), _slide(tmp_path / "g2.tif", seed=2)]
    out = str(tmp_path / "out")
    status = main(["cohort", bad, *good, "--weights", weights, "--out", out, *ARGS, "--engine", "ray",
                   "--cpus-per-worker", "0.5", "--retries", "2"])
    assert status == 1
    err = capsys.readouterr().err
    assert "bad.tif: FAILED after 3 attempt(s)" in err and "Traceback" not in err
    rows = _rows(out)
    assert rows[bad]["status"] == "failed" and "Corrupt JPEG" in rows[bad]["error"]
    assert all(rows[g]["status"] == "done" for g in good)
    kinds = [e["event"] for e in _events(out) if e.get("slide") == bad]
    assert kinds == ["start", "retry", "start", "retry", "start", "fail"], kinds
    assert json.load(open(os.path.join(out, "bad", "status.json")))["state"] == "failed"


_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import SlowDense
from pyfastscan.cohort import scan_cohort
import test_cohort
res = scan_cohort(sys.argv[4:], test_cohort._slow_model(float(sys.argv[3])), sys.argv[2], alpha=1, roi_outputs=5,
                  heatmap_dtype="float32", progress=False)
"""


def test_a_killed_driver_then_the_same_command_again(tmp_path):
    from pyfastscan.cohort import scan_cohort

    slides = [_slide(tmp_path / f"s{k}.tif", seed=k) for k in range(4)]  # 6 ROIs of 5 x 5 cells each
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, TESTS, out, "0.1", *slides])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "cohort.jsonl")) and \
                any(e["event"] == "finish" for e in _events(out)):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode != 0, "the cohort finished before the driver could be killed"
    finished = {e["slide"] for e in _events(out) if e["event"] == "finish"}
    assert 1 <= len(finished) < len(slides)
    stamps = {s: os.stat(os.path.join(out, f"s{k}", "report.json")).st_mtime_ns
              for k, s in enumerate(slides) if s in finished}
    res = scan_cohort(slides, _slow_model(0.0), out, alpha=1, roi_outputs=5, heatmap_dtype="float32",
                      progress=False)
    assert res.exit_status == 0
    status = {r.slide: r.status for r in res.records}
    assert all(status[s] == ("skipped" if s in finished else "done") for s in slides), status
    assert all(os.stat(os.path.join(out, f"s{k}", "report.json")).st_mtime_ns == stamps[s]
               for k, s in enumerate(slides) if s in finished)
    # the slide the driver was inside resumed from its checkpoint
    interrupted = [r for r in res.records if r.status == "done" and r.rois_resumed]
    assert len(interrupted) <= 1
    for r in interrupted:
        assert r.rois_computed + r.rois_resumed == json.load(open(os.path.join(r.folder, "report.json")))["rois_scanned"]


def test_one_slide_over_two_ray_workers_equals_the_local_scan(tmp_path, ray_session):
    from pyfastscan import scan_slide
    from pyfastscan.models import tellez_cnn

    path = _tiled(tmp_path / "one.tif", _tissue(h=180, w=170, seed=6))
    torch.manual_seed(0)
    model = tellez_cnn().eval()
    kw = dict(alpha=2, roi_outputs=6, progress=False)
    local = scan_slide(path, model, **kw)
    ckpt = str(tmp_path / "ray.ckpt")
    spread = scan_slide(path, model, engine="ray", workers=2, checkpoint=ckpt, **kw)
    assert local.n_rois == spread.n_rois >= 8
    assert np.array_equal(local.heatmap, spread.heatmap), f"{np.argwhere(local.heatmap != spread.heatmap)[:5]}"
    assert [(d.probability, d.x, d.y) for d in local.detections] == [(d.probability, d.x, d.y)
                                                                     for d in spread.detections]
    again = scan_slide(path, model, engine="ray", workers=2, checkpoint=ckpt, resume=True, **kw)
    assert again.n_rois_resumed == again.n_rois and np.array_equal(again.heatmap, local.heatmap)


def test_pyfastscan_scan_over_two_ray_workers(tmp_path, weights, ray_session):
    path = _tiled(tmp_path / "one.tif", _tissue(h=180, w=170, seed=7))
    args = ["--weights", weights, *ARGS, "--roi-outputs", "6"]
    assert main(["scan", path, "--out", str(tmp_path / "local"), *args]) == 0
    assert main(["scan", path, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2", *args]) == 0
    assert np.array_equal(_heat(tmp_path / "local"), _heat(tmp_path / "ray"))
    assert main(["scan", path, "--out", str(tmp_path / "x"), "--workers", "2", *args]) == 2  # workers are Ray's


def test_bad_cohort_options_are_usage_errors(tmp_path, weights, capsys):
    from pyfastscan.cohort import scan_cohort
    from pyfastscan.errors import InvalidArgumentError

    slide = _slide(tmp_path / "s.tif")
    with pytest.raises(InvalidArgumentError, match="engine must be one of"):
        scan_cohort([slide], None, str(tmp_path / "o"), engine="dask")
    with pytest.raises(InvalidArgumentError, match="retries must be an integer"):
        scan_cohort([slide], None, str(tmp_path / "o"), retries=-1)
    with pytest.raises(InvalidArgumentError, match="are for engine='ray'"):
        scan_cohort([slide], None, str(tmp_path / "o"), workers=2)
    assert main(["cohort", "--weights", weights, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no slides" in capsys.readouterr().err
    lst = tmp_path / "slides.txt"
    lst.write_text("# the cohort\ns.tif\n\n")
    assert main(["cohort", "--list", str(lst), "--weights", weights, "--out", str(tmp_path / "o"), *ARGS]) == 0
    assert _rows(str(tmp_path / "o"))[slide]["status"] == "done"


def test_the_event_log_is_appended_to_and_a_torn_last_line_is_dropped(tmp_path):
    """Each event is one appended line (the file is never rewritten per event: a large
    cohort's log would be written again with every event); an earlier run's log is kept,
    and a last line a crash tore mid-write is dropped once, so every line parses."""
    from pyfastscan.cohort.run import Ledger

    out = str(tmp_path)
    path = os.path.join(out, "cohort.jsonl")
    earlier = [json.dumps({"time": 1.0, "event": "run"}), json.dumps({"time": 2.0, "event": "start", "slide": "a"})]
    with open(path, "w") as f:
        f.write("\n".join(earlier) + '\n{"time": 3.0, "event": "fin')  # the driver killed mid-write
    ledger = Ledger(out, [], retries=0, progress=False)
    assert open(path).read() == "".join(e + "\n" for e in earlier)
    inode = os.stat(path).st_ino
    for k in range(5):
        ledger.event("run", note=k)
        assert os.stat(path).st_ino == inode  # appended in place, not replaced
    events = _events(out)
    assert [e["event"] for e in events] == ["run", "start"] + ["run"] * 5
    assert [e.get("note") for e in events[2:]] == list(range(5))
    size = os.path.getsize(path)
    Ledger(out, [], retries=0, progress=False)  # a whole log is left as it is
    assert os.path.getsize(path) == size and os.stat(path).st_ino == inode


def test_the_ray_driver_loop_balances_requeues_lost_calls_and_raises_others():
    """pipeline.distributed.dispatch, both engines' loop, against a stand-in for Ray whose
    calls finish in the order they were made: the least loaded actor gets the next item,
    never more than per_actor in flight; a lost actor's call is yielded (the caller
    requeues it), any other failure is raised."""
    from collections import deque

    from pyfastscan.pipeline.distributed import dispatch

    class Lost(Exception):
        pass

    class FakeRay:
        def __init__(self):
            self.in_flight = {}

        def wait(self, refs, num_returns):
            return [min(refs)], []  # the earliest call finishes first

        def get(self, ref):
            i, item = self.in_flight.pop(ref)
            if item == "lost-once" and not seen_lost:
                seen_lost.append(i)
                raise Lost(f"actor {i} died")
            if item == "bug":
                raise ValueError("a bug in the worker")
            return f"{item} by {i}"

    ray, seen_lost, counter, most = FakeRay(), [], [0], {}

    def submit(i, item):
        counter[0] += 1
        ray.in_flight[counter[0]] = (i, item)
        flying = sum(1 for j, _ in ray.in_flight.values() if j == i)
        most[i] = max(most.get(i, 0), flying)
        return counter[0]

    queue = deque(["a", "lost-once", "b", "c", "d", "e"])
    got = []
    for i, item, value, exc in dispatch(ray, 2, queue, submit, (Lost,), per_actor=2):
        if exc is not None:
            assert isinstance(exc, Lost) and item == "lost-once"
            queue.appendleft(item)  # retried next
            continue
        got.append(value)
    assert sorted(v.split(" by ")[0] for v in got) == ["a", "b", "c", "d", "e", "lost-once"]
    assert set(most) == {0, 1} and max(most.values()) == 2  # both actors used, at most 2 calls each
    assert got[0] == "a by 0" and seen_lost == [1]  # "a" to actor 0, then the least loaded: actor 1
    with pytest.raises(ValueError, match="a bug"):
        list(dispatch(ray, 1, deque(["bug"]), submit, (Lost,)))
