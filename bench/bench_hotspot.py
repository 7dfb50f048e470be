"""Mitotic hotspot counts on a whole slide: 3,000 detections on a 25 x 50 mm slide at
0.25 um/px, step 8 um (about 20 million centres), circle of 2 mm^2 (DESIGN.md 4).

    .venv/bin/pytest bench/bench_hotspot.py --benchmark-only --benchmark-json=hotspot.json
    .venv/bin/python bench/report.py hotspot.json

Providers, one run, same points: ``fftconvolve`` (the usual shortcut: rasterise the
points onto the grid, scipy.signal.fftconvolve with a disk; not exact, points snap to
cells) and ``cpu`` (pyfastscan's exact C++ kernel). ``stats 2um`` times hotspot_stats at
a 2 um step (about 300 million centres) in a fresh process and records its peak RSS
(VmHWM) before and after the call.
"""
import json
import math
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from pyfastscan.ops import hotspot_counts

MPP = 0.25
SLIDE = (int(50_000 / MPP), int(25_000 / MPP))  # (width, height) level-0 px: 50 x 25 mm
STEP_UM = 8.0
POINTS = torch.rand(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.tensor(
    SLIDE, dtype=torch.float64)


def _fft_baseline(points):
    from scipy.signal import fftconvolve

    step = STEP_UM / MPP
    rows, cols = math.ceil(SLIDE[1] / step), math.ceil(SLIDE[0] / step)
    raster = np.zeros((rows, cols), dtype=np.float32)
    np.add.at(raster, ((points[:, 1] / step).astype(int), (points[:, 0] / step).astype(int)), 1)
    r = math.sqrt(2e6 / math.pi) / STEP_UM  # radius in cells
    k = int(r)
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    disk = (xx * xx + yy * yy <= r * r).astype(np.float32)
    return np.rint(fftconvolve(raster, disk, mode="same")).astype(np.int32)


def _info(benchmark, provider):
    benchmark.group = "hotspot 3000 points, 25x50 mm, circle 2 mm^2"
    benchmark.extra_info.update(provider=provider)


@pytest.mark.parametrize("provider", ["fftconvolve", "cpu"])
def test_counts_8um(benchmark, provider):
    _info(benchmark, provider)
    if provider == "fftconvolve":
        pytest.importorskip("scipy")
        run = lambda: _fft_baseline(POINTS.numpy())  # noqa: E731
    else:
        run = lambda: hotspot_counts(POINTS, slide_size=SLIDE, mpp=MPP, step_um=STEP_UM, backend="cpu")  # noqa: E731
    result = run()
    counts = result if provider == "fftconvolve" else result.counts.numpy()
    benchmark.extra_info["centres"] = int(counts.size)
    if provider == "cpu":  # exactness: spot rows against the brute-force oracle
        rows = hotspot_counts(POINTS, slide_size=SLIDE, mpp=MPP, step_um=STEP_UM * 25, backend="torch").counts
        coarse = hotspot_counts(POINTS, slide_size=SLIDE, mpp=MPP, step_um=STEP_UM * 25, backend="cpu").counts
        assert torch.equal(rows, coarse)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


_STATS_CHILD = """
import json, sys, time, torch
from pyfastscan.ops import hotspot_stats, last_backend
def hwm_kb():  # peak RSS of this process image (VmHWM restarts at exec, ru_maxrss does not)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
points = torch.tensor(json.loads(sys.stdin.read()), dtype=torch.float64)
base = hwm_kb()
t = time.perf_counter()
s = hotspot_stats(points, slide_size=%r, mpp=%r, step_um=2.0)
elapsed = time.perf_counter() - t
peak = hwm_kb()
print(json.dumps(dict(seconds=elapsed, base_mb=base / 1024, peak_mb=peak / 1024, centres=%d,
                      positions=s.n_positions, max=s.max_count, p95=s.percentile_count,
                      backend=last_backend("hotspot_counts"))))
"""


def test_stats_2um(benchmark):
    """hotspot_stats at 2 um in a fresh process, so its peak RSS is this call's (minus the
    interpreter and torch, reported as base_mb)."""
    _info(benchmark, "stats 2um")
    step = 2.0 / MPP
    centres = math.ceil(SLIDE[0] / step) * math.ceil(SLIDE[1] / step)
    code = _STATS_CHILD % (SLIDE, MPP, centres)

    def run():
        # cwd elsewhere: from the repository root, "import pyfastscan" would find the source
        # tree (no compiled _C) instead of the installed package
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(POINTS.tolist()), capture_output=True,
                             text=True, check=True, cwd=tempfile.gettempdir())
        return json.loads(out.stdout)

    result = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(result)
    print(f"\nhotspot_stats at 2 um: {result}")
    assert result["backend"] == "cpu" and result["peak_mb"] - result["base_mb"] < 1024
