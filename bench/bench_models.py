"""Patch mode against MONAI's patch loop, and dense against patch mode on a residual net.

    .venv/bin/python -m pytest bench/bench_models.py -o python_files="bench_*.py" --benchmark-only -q
    .venv/bin/pytest bench/bench_models.py --benchmark-only --benchmark-json=models.json
    .venv/bin/python bench/report.py models.json

(a) ``patch``: one ROI of 16 x 16 map cells (64 px patches 16 px apart, a 304 px ROI)
    through a narrow padded ResNet-18 (width 16, random weights), batches of 64, fp32:

      pyfastscan patch       PatchModel (strided view, channels_last batches)
      monai grid             what MONAI users write for patch classification:
                             GridPatchDataset + a patch iterator with overlap + a batched
                             DataLoader, the model on each batch, outputs scattered by the
                             patch coordinates (a faithful plain-PyTorch transcription of
                             that loop when ``import monai`` fails)
      monai grid (cl)        the same with the model and batches in channels_last

    ``ratio`` interleaves ROUNDS runs of pyfastscan and of MONAI's loop and reports the
    median of paired MONAI / pyfastscan times (this shared 2-core machine drifts between
    rounds). Target: >= 1.0x.
(b) ``dense``: a padding-free ResNet-like net (``pyfastscan.models.residual_fcn``: residual blocks with
    cropped skips), dense (``to_dense``) against patch mode on the same ROI and grid;
    speed-up beside the multiply-add ratio, target: the speed-up >= 0.9x that ratio.

Threads: PYFASTSCAN_BENCH_THREADS (default 1). The two cores of the development machine
are shared with other jobs; at two threads OpenMP barriers wait for descheduled threads
and the same call varies up to 5x between runs (a 0.2 MB strided copy: 5 ms or 240 ms),
so by default both providers run on one thread, recorded in extra_info.

Every provider's map is checked before timing: in (a) against the float64 model on every
patch (each fp32 path within 2x the error of MONAI's fp32 loop, tests/helpers.py); in (b)
the dense map against patch mode, both in float64 on 8 x 8 cells (1e-9 relative: correct
paths agree to ~1e-15, a wrong map is off by O(1); in fp32 dense mode's folded BatchNorm
rounds differently from the unchanged network, so a 2x-error rule does not apply).
"""
import functools
import os
import statistics
import time
from itertools import product

import pytest
import torch
from torch import nn

from helpers import assert_low_precision
from pyfastscan import InvalidArgumentError, to_dense
from pyfastscan.models import residual_fcn
from pyfastscan.models.resnet import resnet18
from pyfastscan.patch import PatchModel

PATCH, STEP, CELLS, BATCH, WIDTH = 64, 16, 16, 64, 16
SIDE = PATCH + (CELLS - 1) * STEP
ROUNDS = 5

try:
    import monai  # noqa: F401
    from monai.data import DataLoader, GridPatchDataset
    from monai.data.utils import iter_patch

    MONAI = f"monai {monai.__version__}"
except ImportError:  # pragma: no cover - the transcription below stands in
    MONAI = None

_CACHE = {}
THREADS = int(os.environ.get("PYFASTSCAN_BENCH_THREADS", "1"))


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


def _model():
    if "resnet" not in _CACHE:
        torch.manual_seed(0)
        m = resnet18(2, width=WIDTH)
        for mod in m.modules():  # non-trivial BatchNorm statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
        _CACHE["resnet"] = m.eval()
    return _CACHE["resnet"]


def _roi(side=SIDE, seed=0):
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ MONAI's patch loop


def _transcribed_patches(image, patch, step):
    """MONAI's iter_patch with mode=None (no padding): row-major patch corners
    range(0, H - patch + 1, step) x range(0, W - patch + 1, step), each patch yielded with
    its [[c0, c1], [h0, h1], [w0, w1]] coordinates."""
    c, h, w = image.shape
    for y, x in product(range(0, h - patch + 1, step), range(0, w - patch + 1, step)):
        yield image[:, y:y + patch, x:x + patch], torch.tensor([[0, c], [y, y + patch], [x, x + patch]])


def _batches(image, patch, step, batch):
    """(patches, coords) batches as MONAI's DataLoader(GridPatchDataset(...)) yields them
    (patch iterator with overlap 1 - step / patch; default collation stacks the patches)."""
    if MONAI is not None:
        patch_iter = functools.partial(iter_patch, patch_size=(None, patch, patch), overlap=1.0 - step / patch,
                                       mode=None, copy_back=False)
        yield from DataLoader(GridPatchDataset(data=[image], patch_iter=patch_iter), batch_size=batch, num_workers=0)
        return
    it = _transcribed_patches(image, patch, step)
    while True:
        chunk = [next(it, None) for _ in range(batch)]
        chunk = [c for c in chunk if c is not None]
        if not chunk:
            return
        yield torch.stack([p for p, _ in chunk]), torch.stack([c for _, c in chunk])


def monai_loop(model, roi, patch=PATCH, step=STEP, batch=BATCH, channels_last=False):
    """The map of ``model`` over ``roi`` (1, C, H, W) the MONAI way: (1, K, ny, nx)."""
    ny, nx = (roi.shape[2] - patch) // step + 1, (roi.shape[3] - patch) // step + 1
    out = None
    with torch.inference_mode():
        for patches, coords in _batches(roi[0], patch, step, batch):
            if channels_last:
                patches = patches.contiguous(memory_format=torch.channels_last)
            y = model(torch.as_tensor(patches)).reshape(patches.shape[0], -1)
            if out is None:
                out = y.new_empty(1, y.shape[1], ny, nx)
            coords = torch.as_tensor(coords)
            out[0, :, coords[:, 1, 0] // step, coords[:, 2, 0] // step] = y.T
    return out


def _reference64(model, roi, patch=PATCH, step=STEP):
    """The float64 model on every patch: (1, K, ny, nx)."""
    m64 = _CACHE.setdefault(("f64", id(model)), __import__("copy").deepcopy(model).double())
    with torch.inference_mode():
        return monai_loop(m64, roi.double(), patch, step)


# ------------------------------------------------------------------ (a) patch mode vs MONAI


def _info(benchmark, group, provider, **kw):
    benchmark.group = group
    benchmark.extra_info.update(suite="models", provider=provider, threads=THREADS, **kw)


GROUP_A = f"patch mode ResNet-18 w{WIDTH}, {PATCH} px patches step {STEP}, {CELLS}x{CELLS} cells, fp32"


def _check(out, roi):
    ref = _reference64(_model(), roi)
    monai_out = _CACHE.setdefault("monai_out", monai_loop(_model(), roi))
    assert out.shape == ref.shape == (1, 2, CELLS, CELLS), f"{tuple(out.shape)}"
    assert (monai_out - ref).abs().max() <= 1e-4 * ref.abs().max()  # MONAI's loop itself is right
    assert_low_precision(out, monai_out, ref)


def test_patch_pyfastscan(benchmark):
    pm = PatchModel(_model(), PATCH, STEP, batch_size=BATCH)
    roi = _roi()
    with torch.inference_mode():
        _check(pm(roi), roi)
    _info(benchmark, GROUP_A, "pyfastscan patch", cells=CELLS ** 2, macs=pm.multiply_adds(SIDE))
    with torch.inference_mode():
        benchmark.pedantic(pm, args=(roi,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_patch_monai(benchmark, channels_last):
    model = _model()
    if channels_last:
        model = _CACHE.setdefault("cl", __import__("copy").deepcopy(model).to(memory_format=torch.channels_last))
    roi = _roi()
    _check(monai_loop(model, roi, channels_last=channels_last), roi)
    name = f"{MONAI or 'monai transcription'} grid" + (" (cl)" if channels_last else "")
    _info(benchmark, GROUP_A, name, cells=CELLS ** 2)
    benchmark.pedantic(monai_loop, args=(model, roi), kwargs=dict(channels_last=channels_last), rounds=3,
                       warmup_rounds=1)


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def test_patch_ratio(benchmark):
    """Median over ROUNDS interleaved pairs of MONAI loop / PatchModel time."""
    pm = PatchModel(_model(), PATCH, STEP, batch_size=BATCH)
    roi = _roi()

    def rounds():
        with torch.inference_mode():
            pm(roi)  # warm-up
            monai_loop(_model(), roi)
            pairs = [(_timed(monai_loop, _model(), roi), _timed(pm, roi)) for _ in range(ROUNDS)]
        return sorted(m / p for m, p in pairs), pairs

    _info(benchmark, GROUP_A + " (ratio)", "monai / pyfastscan")
    ratios, pairs = benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(ratio=ratio, ratios=ratios, pairs_s=pairs, monai=MONAI or "transcription",
                                target=1.0)
    print(f"\npatch mode vs {MONAI or 'MONAI transcription'}: {ratio:.2f}x faster per cell "
          f"(pyfastscan {statistics.median(p for _, p in pairs) / CELLS ** 2 * 1e3:.2f} ms/cell, "
          f"MONAI {statistics.median(m for m, _ in pairs) / CELLS ** 2 * 1e3:.2f} ms/cell; target >= 1.0x)")


# ------------------------------------------------------------------ (b) dense vs patch mode


def _valid_patch(model):
    """Smallest input side with a 1 x 1 output: the patch."""
    with torch.inference_mode():
        for side in range(8, 400):
            try:
                if model(torch.zeros(1, 3, side, side)).shape[-1] == 1:
                    return side
            except RuntimeError:
                pass
    raise AssertionError("no patch size found")


GRID = 32  # map cells per side in (b)


def _dense_setup():
    if "valid" not in _CACHE:
        torch.manual_seed(1)
        net = residual_fcn(num_classes=2, width=WIDTH).eval()
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
        try:
            dense = to_dense(net)
        except InvalidArgumentError as exc:
            _CACHE["valid"] = (net, None, str(exc).splitlines()[0])
        else:
            _CACHE["valid"] = (net, dense, None)
    net, dense, reason = _CACHE["valid"]
    if dense is None:
        pytest.skip(f"to_dense does not convert the padding-free residual net yet: {reason}")
    g = dense.geometry
    pm = PatchModel(net, g.patch, g.step, batch_size=BATCH)
    roi = _roi(g.input_side(GRID), seed=3)
    if "valid_checked" not in _CACHE:
        assert g.patch == _valid_patch(net), "dense geometry disagrees with the network's receptive field"
        # in float64, on 8 x 8 cells: correct paths agree to ~1e-15 relative, a wrong map is off by O(1)
        net64 = __import__("copy").deepcopy(net).double()
        small = roi[..., :g.input_side(8), :g.input_side(8)].double()
        with torch.inference_mode():
            d64, p64 = to_dense(net64)(small), PatchModel(net64, g.patch, g.step, batch_size=BATCH)(small)
        assert d64.shape == p64.shape == (1, 2, 8, 8)
        err = (d64 - p64).abs().max().item()
        assert err <= 1e-9 * p64.abs().max().item(), f"dense map differs from patch mode by {err:.3g}"
        _CACHE["valid_checked"] = True
    return net, dense, pm, roi


GROUP_B = f"dense vs patch, padding-free residual net w{WIDTH}, {GRID}x{GRID} cells, fp32"


@pytest.mark.parametrize("kind", ["dense", "patch"])
def test_dense_vs_patch(benchmark, kind):
    net, dense, pm, roi = _dense_setup()
    scanner = dense if kind == "dense" else pm
    _info(benchmark, GROUP_B, kind, cells=GRID ** 2, macs=scanner.multiply_adds(roi.shape[-1]))
    with torch.inference_mode():
        benchmark.pedantic(scanner, args=(roi,), rounds=3, warmup_rounds=1)


def test_dense_speedup(benchmark):
    """Median over ROUNDS interleaved pairs of patch / dense time, beside the multiply-add ratio."""
    net, dense, pm, roi = _dense_setup()
    mac_ratio = pm.multiply_adds(roi.shape[-1]) / dense.multiply_adds(roi.shape[-1])

    def rounds():
        with torch.inference_mode():
            dense(roi)
            pm(roi)
            return sorted(_timed(pm, roi) / _timed(dense, roi) for _ in range(ROUNDS))

    _info(benchmark, GROUP_B + " (ratio)", "patch / dense")
    ratios = benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    speedup = statistics.median(ratios)
    benchmark.extra_info.update(speedup=speedup, ratios=ratios, mac_ratio=mac_ratio, target=0.9 * mac_ratio)
    print(f"\ndense vs patch mode: {speedup:.1f}x faster; multiply-add ratio {mac_ratio:.1f}x "
          f"({speedup / mac_ratio:.2f} of it; target >= 0.9)")
