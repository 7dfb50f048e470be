"""Mitotic hotspot counts: every backend integer-equal to the brute-force oracle (DESIGN.md 4)."""
import math

import numpy as np
import pytest
import torch

from helpers import require_backend
from pyfastscan import InvalidArgumentError
from pyfastscan.ops import hotspot_counts, hotspot_stats, last_backend, mitotic_grade
from pyfastscan.ops.hotspot import _percentile_from_histogram
from pyfastscan.reference.hotspot import grid_len

FAST = ("cpu", "numba")
MPP = 0.25


def _points(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor(size, dtype=torch.float64)


def _both(points, backend, **kw):
    """(fast, oracle) count maps for the same call."""
    require_backend(backend)
    fast = hotspot_counts(points, backend=backend, **kw)
    assert last_backend("hotspot_counts") == backend
    oracle = hotspot_counts(points, backend="torch", **kw)
    return fast, oracle


def _assert_equal(fast, oracle):
    assert fast.counts.dtype == torch.int32 and fast.counts.shape == oracle.counts.shape
    diff = (fast.counts != oracle.counts).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} centres differ, first {diff[:3].tolist()}"


# area 0.01 mm^2 at 0.25 um/px: circle radius 225.7 px; step 10 um = 40 px
SMALL = dict(slide_size=(1530, 1010), mpp=MPP, area_mm2=0.01, step_um=10.0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("window", ["circle", "rect"])
def test_random_points_equal_oracle(backend, window):
    pts = _points(60, SMALL["slide_size"], seed=1)
    _assert_equal(*_both(pts, backend, window=window, **SMALL))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("window", ["circle", "rect"])
def test_points_on_window_boundaries_and_slide_edges(backend, window):
    """Points placed exactly where the window test is an equality, and on slide edges."""
    step = SMALL["step_um"] / MPP  # 40 px
    area_px = SMALL["area_mm2"] * 1e6 / MPP ** 2
    r = math.sqrt(area_px / math.pi)
    half_w, half_h = math.sqrt(area_px * 4 / 3) / 2, math.sqrt(area_px * 3 / 4) / 2
    c = lambda j: (j + 0.5) * step  # noqa: E731
    pts = [(0.0, 0.0), (1529.999, 1009.999), (0.0, 1009.0), (1529.0, 0.0), (c(3), c(2)),
           (c(5) + half_w, c(4)), (c(5), c(4) + half_h), (c(6) - half_w, c(7) - half_h),
           (c(10) + r, c(8)), (c(9), c(12) - r), (c(11) + 0.6 * r, c(11) + 0.8 * r),  # 3-4-5 triangle on the circle
           (c(20) + 3.0, c(4) + 4.0)]
    pts = [(min(x, 1529.999), min(y, 1009.999)) for x, y in pts]
    fast, oracle = _both(torch.tensor(pts, dtype=torch.float64), backend, window=window, **SMALL)
    _assert_equal(fast, oracle)
    assert oracle.counts.max() >= 2


@pytest.mark.parametrize("backend", FAST)
def test_clustered_one_and_no_points(backend):
    g = torch.Generator().manual_seed(3)
    cluster = torch.tensor([700.0, 500.0], dtype=torch.float64) + 30 * torch.randn(40, 2, generator=g,
                                                                                     dtype=torch.float64)
    for pts in (cluster, torch.tensor([[10.0, 20.0]])):
        fast, oracle = _both(pts, backend, window="circle", **SMALL)
        _assert_equal(fast, oracle)
        assert oracle.counts.max() >= 1
    empty = hotspot_counts(torch.zeros(0, 2), window="circle", backend=backend, **SMALL)
    assert empty.counts.shape == oracle.counts.shape and int(empty.counts.abs().sum()) == 0  # no points: zeros


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("step_um", [7.3, 13.0, 50.0])
def test_steps_that_do_not_divide_the_slide(backend, step_um):
    kw = dict(SMALL, step_um=step_um)
    fast, oracle = _both(_points(25, SMALL["slide_size"], seed=4), backend, window="circle", **kw)
    _assert_equal(fast, oracle)
    step = step_um / MPP
    rows, cols = fast.counts.shape
    assert (cols - 0.5) * step < 1530 <= (cols + 0.5) * step and (rows - 0.5) * step < 1010 <= (rows + 0.5) * step


def test_grid_len_counts_centres_inside():
    for size, step in [(10, 4), (8, 4), (6, 4), (1, 4), (100, 0.3), (1530, 29.2)]:
        n = grid_len(size, step)
        assert all((j + 0.5) * step < size for j in range(n)) and (n + 0.5) * step >= size


def test_default_areas_and_geometry():
    cm = hotspot_counts([[5000.0, 5000.0]], slide_size=(10000, 10000), mpp=MPP, step_um=50)
    assert cm.area_mm2 == 2.0 and cm.window == "circle" and cm.step_px == 200.0 and cm.origin_xy == (100.0, 100.0)
    # a 2 mm^2 circle has radius 797.9 um = 3191.5 px: centres within it count the point
    cy, cx = torch.meshgrid(torch.arange(cm.counts.shape[0]), torch.arange(cm.counts.shape[1]), indexing="ij")
    d2 = ((cx + 0.5) * 200 - 5000) ** 2 + ((cy + 0.5) * 200 - 5000) ** 2
    assert torch.equal(cm.counts.bool(), d2 <= 2e6 / MPP ** 2 / math.pi)
    rect = hotspot_counts([[5000.0, 5000.0]], slide_size=(10000, 10000), mpp=MPP, step_um=50, window="rect")
    assert rect.area_mm2 == 2.37
    w_um, h_um = math.sqrt(2.37e6 * 4 / 3), math.sqrt(2.37e6 * 3 / 4)
    cols, rows = rect.counts.any(0).sum().item(), rect.counts.any(1).sum().item()
    assert abs(cols * 50 - w_um) <= 50 and abs(rows * 50 - h_um) <= 50  # 4:3, 2.37 mm^2


# ----------------------------------------------------------------------------- stats


@pytest.mark.parametrize("q", [0, 50, 95, 99.5, 100])
def test_percentile_from_histogram_equals_numpy(q):
    rng = np.random.default_rng(0)
    for values in (rng.integers(1, 30, 1001), rng.integers(1, 4, 7), np.array([5])):
        hist = np.bincount(values)
        assert _percentile_from_histogram(hist, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)


@pytest.mark.parametrize("window", ["circle", "rect"])
def test_stats_equal_full_map_statistics(window, monkeypatch):
    import pyfastscan.ops.hotspot as hs

    monkeypatch.setattr(hs, "_BAND_BYTES", 4 * 30 * 5)  # force many bands
    pts = torch.cat([_points(40, SMALL["slide_size"], seed=5), torch.tensor([[700.0, 500.0]]).repeat(6, 1)])
    full = hotspot_counts(pts, window=window, backend="torch", **SMALL).counts.numpy()
    seen = []
    stats = hotspot_stats(pts, window=window, progress=lambda done, total: seen.append((done, total)), **SMALL)
    nz = full[full > 0]
    assert stats.max_count == full.max() and stats.n_positions == nz.size and stats.n_detections == 46
    assert stats.percentile_count == pytest.approx(float(np.percentile(nz, 95)), abs=1e-9)
    i, j = np.unravel_index(np.argmax(full), full.shape)
    step = SMALL["step_um"] / MPP
    assert stats.max_center_xy == ((j + 0.5) * step, (i + 0.5) * step)
    assert len(seen) > 1 and seen[-1] == (full.shape[0], full.shape[0])
    assert np.array_equal(stats.histogram, np.bincount(nz))


def test_stats_with_tissue_mask():
    pts = _points(30, SMALL["slide_size"], seed=6)
    full = hotspot_counts(pts, window="circle", backend="torch", **SMALL).counts.numpy()
    mask = np.zeros((101, 153), dtype=bool)  # downsample 10
    mask[20:80, 30:120] = True
    stats = hotspot_stats(pts, window="circle", tissue_mask=mask, **SMALL)
    step = SMALL["step_um"] / MPP
    cy = ((np.arange(full.shape[0]) + 0.5) * step / 10).astype(int)
    cx = ((np.arange(full.shape[1]) + 0.5) * step / 10).astype(int)
    inc = mask[cy[:, None], cx[None, :]]
    assert stats.n_positions == inc.sum()
    assert stats.percentile_count == pytest.approx(float(np.percentile(full[inc], 95)), abs=1e-9)
    assert stats.max_count == full[inc].max()


@pytest.mark.parametrize("exclude", ["zero", "none"])
def test_stats_exclude_rule(exclude):
    pts = _points(30, SMALL["slide_size"], seed=6)
    full = hotspot_counts(pts, window="circle", backend="torch", **SMALL).counts.numpy()
    mask = np.zeros((101, 153), dtype=bool)
    mask[20:80, 30:120] = True
    for tissue in (None, mask):
        stats = hotspot_stats(pts, window="circle", tissue_mask=tissue, exclude=exclude, **SMALL)
        inc = np.ones(full.shape, dtype=bool)
        if tissue is not None:
            step = SMALL["step_um"] / MPP
            cy = ((np.arange(full.shape[0]) + 0.5) * step / 10).astype(int)
            cx = ((np.arange(full.shape[1]) + 0.5) * step / 10).astype(int)
            inc = mask[cy[:, None], cx[None, :]]
        if exclude == "zero":
            inc &= full > 0
        assert stats.n_positions == inc.sum()
        assert stats.percentile_count == pytest.approx(float(np.percentile(full[inc], 95)), abs=1e-9)
    with pytest.raises(InvalidArgumentError, match="exclude"):
        hotspot_stats(pts, exclude="background", **SMALL)


def test_no_detections_is_not_an_error():
    stats = hotspot_stats(np.zeros((0, 2)), **SMALL)
    assert stats.max_count == 0 and stats.max_center_xy is None and stats.n_positions == 0
    assert stats.percentile_count == 0.0 and stats.n_detections == 0


def test_mitotic_grade_boundaries():
    assert [mitotic_grade(c) for c in (0, 6, 6.5, 7, 20, 20.01, 21, 100)] == [1, 1, 2, 2, 2, 3, 3, 3]
    assert mitotic_grade(10, theta1=10, theta2=10) == 1 and mitotic_grade(11, 10, 10) == 3
    with pytest.raises(InvalidArgumentError):
        mitotic_grade(-1)
    with pytest.raises(InvalidArgumentError):
        mitotic_grade(5, theta1=30, theta2=20)


@pytest.mark.parametrize("kw,message", [
    (dict(points_xy=[[2000.0, 5.0]]), "outside the slide"),
    (dict(points_xy=[[float("nan"), 5.0]]), "NaN"),
    (dict(points_xy=[[1.0, 2.0, 3.0]]), r"shape \(D, 2\)"),
    (dict(mpp=0.0), "mpp must be a number > 0, got 0.0"),
    (dict(mpp=float("nan")), "mpp"),
    (dict(area_mm2=-1.0), "area_mm2"),
    (dict(step_um=0), "step_um"),
    (dict(window="hexagon"), "window must be"),
    (dict(slide_size=(0, 10)), "slide_size"),
])
def test_bad_input(kw, message):
    args = dict(points_xy=[[1.0, 2.0]], slide_size=(1000, 1000), mpp=MPP)
    args.update(kw)
    pts = args.pop("points_xy")
    with pytest.raises(InvalidArgumentError, match=message):
        hotspot_counts(pts, **args)


def test_points_from_any_dlpack_producer():
    """CuPy arrays arrive through DLPack; a numpy-backed producer stands in for one here."""

    class Producer:  # exposes only the DLPack protocol, like a foreign array library
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, *args, **kwargs):
            return self._a.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    pts = _points(20, SMALL["slide_size"], seed=8)
    oracle = hotspot_counts(pts, window="circle", backend="torch", **SMALL)
    via = hotspot_counts(Producer(pts.numpy()), window="circle", **SMALL)
    _assert_equal(via, oracle)

    # a producer from a library with asarray (as CuPy) gets its counts back in that library's type
    import sys
    import types

    fake = types.ModuleType("fakearrays")
    fake.asarray = lambda a: ("fakearrays", np.asarray(a))
    Foreign = type("Foreign", (Producer,), {"__module__": "fakearrays"})
    sys.modules["fakearrays"] = fake
    try:
        back = hotspot_counts(Foreign(pts.numpy()), window="circle", **SMALL).counts
    finally:
        del sys.modules["fakearrays"]
    assert back[0] == "fakearrays" and np.array_equal(back[1], oracle.counts.numpy())
