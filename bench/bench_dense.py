"""Dense scanning of one ROI with the full-width VGG16-FCN (Fast ScanNet, DESIGN.md 2).

    make bench                                         # everything, then the report
    .venv/bin/pytest bench/bench_dense.py --benchmark-only --benchmark-json=dense.json
    .venv/bin/python bench/report.py dense.json        # the dense table, with the targets

One ROI of L_m = 24 (a 48 x 48 map at alpha = 2), random weights (speed does not depend
on them), batch 1, every provider on the same input in one run:

  dense           to_dense(model, alpha, plan, precision): alpha 1, 2, 4, both plans
  shift-stitch    ScanNet-style: the alpha = 1 scanner run alpha^2 times on shifted crops,
                  outputs interleaved
  patch (scaled)  a batch of 244 px patches through the patch classifier, its time scaled
                  to the (alpha * L_m)^2 patches of the ROI

Before timing, each dense map is spot-checked against the patch classifier run on the
patches of a few of its outputs (DESIGN.md 2.2), and every benchmark records its
multiply-adds so the report can print measured ratios beside the cost model's.
"""
import pytest
import torch

from helpers import network_error_bound
from pyfastscan import to_dense
from pyfastscan.dense import _flatten
from pyfastscan.models import vgg16_fcn

L_M = 24
PATCH_BATCH = 16
PRECISIONS = ("fp32", "bf16")
DENSE = [(1, "minimal"), (2, "minimal"), (2, "paper"), (4, "minimal"), (4, "paper")]

_MODEL = {}


def _model():
    if not _MODEL:
        torch.manual_seed(0)
        _MODEL["m"] = vgg16_fcn(num_classes=2).eval()
    return _MODEL["m"]


def _roi(alpha, seed=0):
    side = to_dense(_model(), alpha).geometry.input_side(alpha * L_M)
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _shift_and_stitch(sparse, x, alpha):
    """The alpha = 1 scanner on alpha^2 crops shifted by multiples of S_p / alpha, interleaved."""
    g = sparse.geometry
    step, side = g.stride // alpha, g.input_side(L_M)
    out = None
    for dy in range(alpha):
        for dx in range(alpha):
            y = sparse(x[:, :, dy * step:dy * step + side, dx * step:dx * step + side])
            if out is None:
                out = y.new_empty(y.shape[0], y.shape[1], alpha * L_M, alpha * L_M)
            out[:, :, dy::alpha, dx::alpha] = y
    return out


def _spot_check(out, x, g, count=8):
    """out[i, j] against the patch classifier on the patch at (i, j) * step, for a few (i, j)."""
    idx = torch.randint(0, out.shape[-1], (count, 2), generator=torch.Generator().manual_seed(2)).tolist()
    idx.append([out.shape[-2] - 1, out.shape[-1] - 1])  # the last output needs the ROI's last pixels
    patches = torch.cat([x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch] for i, j in idx])
    with torch.inference_mode():
        expected = _model()(patches).flatten(1)
    got = torch.stack([out[0, :, i, j] for i, j in idx])
    # both are float32 evaluations of the same sums: each within the propagated bound
    bound = network_error_bound(_flatten(_model()), patches.double(), torch.float32).flatten(1)
    err = (got.double() - expected.double()).abs()
    assert (err <= 2 * bound).all(), f"dense output differs from the patch classifier: {err.max():.3g}"


def _info(benchmark, kind, alpha, plan, precision, macs, scale=1.0):
    benchmark.group = f"dense VGG16-FCN L_m={L_M} {precision}"
    benchmark.extra_info.update(suite="dense", provider=f"{kind} a={alpha}" + (f" {plan}" if plan else ""),
                                kind=kind, alpha=alpha, plan=plan, precision=precision, macs=macs, scale=scale)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("alpha,plan", DENSE, ids=[f"a{a}-{p}" for a, p in DENSE])
def test_dense(benchmark, alpha, plan, precision):
    dense = to_dense(_model(), alpha, plan=plan, precision=precision)
    x = _roi(alpha)
    with torch.inference_mode():
        out = dense(x)
    assert out.shape == (1, 2, alpha * L_M, alpha * L_M)
    if precision == "fp32":
        _spot_check(out, x, dense.geometry)
    _info(benchmark, "dense", alpha, plan, precision, dense.multiply_adds(x.shape[-1]))
    with torch.inference_mode():
        benchmark.pedantic(dense, args=(x,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("alpha", [2, 4])
def test_shift_and_stitch(benchmark, alpha, precision):
    sparse = to_dense(_model(), 1, precision=precision)
    x = _roi(alpha)
    _info(benchmark, "shift-stitch", alpha, None, precision, alpha * alpha * sparse.multiply_adds(
        sparse.geometry.input_side(L_M)))
    with torch.inference_mode():
        benchmark.pedantic(_shift_and_stitch, args=(sparse, x, alpha), rounds=2, warmup_rounds=1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_based(benchmark, precision):
    """A batch of patches; the report scales it to the (alpha * L_m)^2 patches of each alpha."""
    sparse = to_dense(_model(), 1, precision=precision)
    patches = torch.rand(PATCH_BATCH, 3, 244, 244, generator=torch.Generator().manual_seed(1))
    _info(benchmark, "patch", 1, None, precision, sparse.multiply_adds(244) * PATCH_BATCH,
          scale=1.0 / PATCH_BATCH)
    with torch.inference_mode():
        benchmark.pedantic(sparse, args=(patches,), rounds=3, warmup_rounds=1)
