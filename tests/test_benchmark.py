"""`pyfastscan bench`: the table users run before they adopt (numbers are measured, not asserted)."""
import json

import pytest

from pyfastscan.cli import main
from pyfastscan.samples import skin_slide_path


def test_bench_json_has_dense_patch_and_read_rows(capsys):
    pytest.importorskip("openslide")
    assert main(["bench", "--arch", "demo_cnn", "--alpha", "2", "--roi-outputs", "8", "--repeats", "1",
                 "--slide", skin_slide_path(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["mode"], r["precision"]): r for r in out["rows"]}
    assert ("dense", "fp32") in rows and ("patch", "fp32") in rows
    assert out["auto_precision"] in ("fp32", "bf16") and out["device"]
    for r in rows.values():
        assert r["cells_per_s"] > 0 and r["multiply_adds"] > 0
    dense, patch = rows["dense", "fp32"], rows["patch", "fp32"]
    # the cost model: a dense cell needs fewer multiply-adds than a patch-mode cell
    assert dense["multiply_adds"] / dense["roi_outputs"] ** 2 < patch["multiply_adds"] / patch["roi_outputs"] ** 2
    assert out["read"]["ceiling_mpx_s"] == pytest.approx(out["read"]["single_thread_mpx_s"] *
                                                         min(out["read"]["readers"], out["read"]["cores"]))
    assert out["read"]["thread_scaling"] > 0


def test_bench_patch_only_model_and_bad_input(capsys):
    assert main(["bench", "--arch", "resnet18", "--arch-kwargs", '{"width": 4}', "--alpha", "1", "--repeats", "1",
                 "--json", "--patch", "64", "--stride", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    # patch mode only, once per precision timed (fp32, and bf16 where auto picks it: an AMX CPU)
    want = ["fp32"] + (["bf16"] if out["auto_precision"] == "bf16" else [])
    assert [(r["mode"], r["precision"]) for r in out["rows"]] == [("patch", p) for p in want]
    assert "padding" in out["dense_refused"]
    assert main(["bench", "--arch", "nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().out


def test_thread_scaling_times_one_thread_against_that_many_each_hashing(monkeypatch):
    """benchmark.thread_scaling: the same hashes per thread, first in the given number of
    threads at once, then in one; the answer is the rate of the first over the second."""
    import hashlib
    import threading

    from pyfastscan import benchmark

    real, seen = hashlib.sha256, []

    def sha256(data):
        seen.append(threading.current_thread())  # the Thread object: idents are reused, these are kept
        return real(data)

    monkeypatch.setattr(hashlib, "sha256", sha256)
    times = iter([0.0, 0.0, 0.025, 0.025, 1.0, 2.0, 2.0, 4.0])  # calibration, 3 threads, then 1 thread
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(times))
    got = benchmark.thread_scaling(3, seconds=0.1)
    calibration = seen[:16]
    assert len(set(calibration)) == 1
    per_thread = (len(seen) - 16) // 4
    assert per_thread == 64  # 16 hashes in 0.025 s -> 64 in 0.1 s
    assert len(set(seen[16:16 + 3 * per_thread])) == 3 and len(set(seen[16 + 3 * per_thread:])) == 1
    assert got == pytest.approx((3 * 64 / 1.0) / (64 / 2.0))


def test_memory_scaling_copies_as_many_buffers_at_once_as_threads_then_one(monkeypatch):
    """benchmark.memory_scaling: each thread copies its own buffer the same number of
    times, first ``threads`` threads at once, then one; the answer is bytes per second of
    the first over the second."""
    import threading

    import numpy as np

    from pyfastscan import benchmark

    real, seen = np.copyto, []

    def copyto(dst, src):
        seen.append((threading.current_thread(), id(dst)))  # Thread objects kept: idents are reused
        return real(dst, src)

    monkeypatch.setattr(np, "copyto", copyto)
    times = iter([0.0, 0.01, 1.0, 2.0, 2.0, 4.0])  # one timed copy, 3 threads, then 1 thread
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(times))
    got = benchmark.memory_scaling(3, seconds=0.1, nbytes=1024)
    reps = 10  # 0.1 s / 0.01 s per copy
    workers = [t for t, _ in seen if t is not threading.current_thread()]
    assert len(workers) == 3 * reps + reps and len(set(workers)) == 4  # 3 threads, then 1
    first = seen[2:2 + 3]  # the 3 buffers' untimed copies before the 3-thread run
    assert len({d for _, d in first}) == 3
    assert got == pytest.approx((3 * reps * 1024 / 1.0) / (reps * 1024 / 2.0))
