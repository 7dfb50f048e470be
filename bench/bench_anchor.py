"""AnchPool / AnchConv at VGG16 shapes: every CPU provider, correctness asserted first.

    make bench                                   # all benchmarks
    .venv/bin/pytest bench/bench_anchor.py --benchmark-only --benchmark-json=anchor.json
    .venv/bin/python bench/report.py anchor.json # median ratios per group

Shapes: 512 channels, 170 x 170 (a conv5-sized VGG16 feature map of a large ROI),
dilation 2, with s_a = d_a (= an ordinary stride-1 dilated layer, so PyTorch has its own
op) and s_a = 2 d_a (the Fast ScanNet post-reconstruction layer, no PyTorch op).
Providers: ``reference`` (pure PyTorch, the spec), ``cpu`` (pyfastscan's C++ / lowering)
and ``pytorch`` (F.max_pool2d / F.conv2d where one computes the same thing).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_bitwise_equal, assert_within_bound
from pyfastscan.ops import anch_conv2d, anch_pool2d, last_backend
from pyfastscan.reference import anch_conv2d_ref, anch_pool2d_ref

C, SIDE, DIL = 512, 170, 2
CASES = {"sa=da=2": (2, 2), "sa=4,da=2": (4, 2)}


def _input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, C, SIDE, SIDE, generator=g)


def _axis(k, sa, da):
    return (k, DIL, sa, da)


def _providers_pool(sa, da):
    p = {
        "reference": lambda x: anch_pool2d_ref(x, _axis(2, sa, da), _axis(2, sa, da)),
        "cpu": lambda x: anch_pool2d(x, 2, anchor_stride=sa, operating_distance=da, dilation=DIL, backend="cpu"),
    }
    if sa == da:
        p["pytorch"] = lambda x: F.max_pool2d(x, 2, stride=1, dilation=DIL)
    return p


def _providers_conv(sa, da):
    p = {
        "reference": lambda x, w, b: anch_conv2d_ref(x, w, b, _axis(3, sa, da), _axis(3, sa, da)),
        "cpu": lambda x, w, b: anch_conv2d(x, w, b, anchor_stride=sa, operating_distance=da, dilation=DIL,
                                           backend="cpu"),
    }
    if sa == da:
        p["pytorch"] = lambda x, w, b: F.conv2d(x, w, b, dilation=DIL)
    return p


def _setup(benchmark, make_providers, case, provider, group):
    """The provider's function for this case (skips when it has none); records the run."""
    providers = make_providers(*CASES[case])
    if provider not in providers:
        pytest.skip(f"no {provider} op for {case}")
    benchmark.group = f"{group} {case}"
    benchmark.extra_info.update(case=case, provider=provider, torch=torch.__version__,
                                threads=torch.get_num_threads())
    return providers


@pytest.mark.parametrize("provider", ["reference", "cpu", "pytorch"])
@pytest.mark.parametrize("case", list(CASES))
def test_anch_pool2d(benchmark, case, provider):
    providers = _setup(benchmark, _providers_pool, case, provider, f"anch_pool2d max {C}x{SIDE}x{SIDE} k2 dil{DIL}")
    x = _input()
    expected = providers["reference"](x)
    with torch.no_grad():
        assert_bitwise_equal(providers[provider](x), expected)
    if provider == "cpu":
        assert last_backend("anch_pool2d") == "cpu"
    benchmark.pedantic(providers[provider], args=(x,), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["reference", "cpu", "pytorch"])
@pytest.mark.parametrize("case", list(CASES))
def test_anch_conv2d(benchmark, case, provider):
    providers = _setup(benchmark, _providers_conv, case, provider, f"anch_conv2d {C}->{C} {SIDE}x{SIDE} k3 dil{DIL}")
    sa, da = CASES[case]
    x = _input()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(C, C, 3, 3, generator=g) / (C * 9) ** 0.5
    b = torch.randn(C, generator=g)
    with torch.no_grad():
        out = providers[provider](x, w, b)
        ax = _axis(3, sa, da)
        ref64 = anch_conv2d_ref(x.double(), w.double(), b.double(), ax, ax)
        abs_ref = anch_conv2d_ref(x.double().abs(), w.double().abs(), b.double().abs(), ax, ax)
        assert_within_bound(out, ref64, abs_ref, C * 9 + 1)
        del ref64, abs_ref
    with torch.no_grad():
        benchmark.pedantic(providers[provider], args=(x, w, b), rounds=3, warmup_rounds=1)
