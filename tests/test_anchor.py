"""AnchPool2d / AnchConv2d: every backend against the reference (DESIGN.md 2.1, 5)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (DTYPES, assert_bitwise_equal, assert_low_precision, assert_within_bound, require_backend)
from pyfastscan import BackendUnavailableError, InvalidArgumentError, _native
from pyfastscan.nn import AnchConv2d, AnchPool2d
from pyfastscan.ops import AnchorAxis, anch_conv2d, anch_pool2d, last_backend
from pyfastscan.reference import anch_conv2d_ref, anch_pool2d_ref, anchor_taps

# (input shape, kernel, anchor_stride, operating_distance, dilation)
CASES = [
    ((1, 1, 1, 1), 1, 1, 1, 1),             # size 1
    ((2, 3, 13, 17), 3, 1, 1, 1),           # prime sizes, stride 1
    ((1, 2, 11, 7), (3, 2), (3, 2), 1, 1),  # standard strided layer, per-axis values
    ((2, 2, 19, 23), 2, 4, 2, 2),           # s_a > d_a (Fast ScanNet after reconstruction)
    ((1, 3, 16, 15), 2, 2, 2, 2),           # s_a = d_a: stride-1 dilated
    ((3, 2, 29, 31), 3, 6, 2, (2, 3)),      # s_a = 3 d_a, mixed dilation
    ((1, 1, 9, 10), (2, 3), (5, 3), (3, 2), 1),
    ((2, 4, 12, 12), 2, 2, 1, 3),           # dilated standard layer
    ((1, 2, 17, 18), 2, 2, 4, 1),           # s_a < d_a: overlapping groups (paper plan, alpha 4)
    ((2, 1, 21, 14), (2, 3), (1, 3), (3, 2), (2, 1)),  # s_a < d_a per axis, mixed with s_a > d_a
]
LAYOUTS = ("contiguous", "non_contiguous", "channels_last")
CPU_BACKENDS = ("cpu", "triton")


def case_id(c):
    return f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}-dil{c[4]}"


def make_input(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "non_contiguous":  # every other column of a wider tensor, then transposed twice
        n, c, h, w = shape
        return torch.randn(n, c, w * 2, h, generator=g, dtype=torch.float64).to(dtype)[:, :, ::2, :].transpose(2, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def axes(c, kernel=None):
    def pair(v):
        return v if isinstance(v, tuple) else (v, v)
    k, s, d, dil = pair(kernel if kernel is not None else c[1]), pair(c[2]), pair(c[3]), pair(c[4])
    return tuple((k[i], dil[i], s[i], d[i]) for i in range(2))


def kwargs(c):
    return dict(anchor_stride=c[2], operating_distance=c[3], dilation=c[4])


# ----------------------------------------------------------------------------- index math


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 5), d=st.integers(1, 4), da=st.integers(1, 6), sa=st.integers(1, 10))
def test_out_len_closed_form_matches_enumeration_and_cpp(n, k, d, da, sa):
    axis = AnchorAxis(k, d, sa, da)
    taps = anchor_taps(n, *axis)
    assert axis.out_len(n) == taps.shape[0]
    if _native.cpu() is not None:
        assert _native.cpu().anchor_out_len(n, tuple(axis)) == taps.shape[0]
    for p in range(taps.shape[0]):
        assert taps[p, 0].item() == axis.start(p)


def test_reference_hand_computed_1d():
    # n = 10, K = 2, d = 1, s_a = 4, d_a = 2: starts 0, 1, 4, 5, 8.
    assert anchor_taps(10, 2, 1, 4, 2).tolist() == [[0, 1], [1, 2], [4, 5], [5, 6], [8, 9]]
    # dilation 2: last tap start + 2 <= 9, so starts 0, 1, 4, 5 (8 + 2 > 9).
    assert anchor_taps(10, 2, 2, 4, 2).tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    x = torch.arange(10.0).reshape(1, 1, 1, 10)
    out = anch_pool2d_ref(x, (1, 1, 1, 1), (2, 1, 4, 2))
    assert out.flatten().tolist() == [1.0, 2.0, 5.0, 6.0, 9.0]
    w = torch.tensor([[[[1.0, 10.0]]]])
    out = anch_conv2d_ref(x, w, torch.tensor([0.5]), (1, 1, 1, 1), (2, 2, 4, 2))
    assert out.flatten().tolist() == [20.5, 31.5, 64.5, 75.5]
    # s_a = 2 < d_a = 4, n = 9, K = 2, so starts must be <= 7: groups 0 1 2 3 | 2 3 4 5 |
    # 4 5 6 7 | 6 7, and start 8 ends the prefix at 14 outputs.
    assert anchor_taps(9, 2, 1, 2, 4)[:, 0].tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7]


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (3, 2), (1, 3)])
def test_reference_matches_pytorch_standard_layers(stride, dilation):
    x = make_input((2, 3, 17, 14), torch.float64, "contiguous")
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    std_axis = lambda k: (k, dilation, stride, 1)  # noqa: E731  (s_a = s, d_a = 1)
    assert torch.equal(anch_pool2d_ref(x, std_axis(3), std_axis(2)),
                       F.max_pool2d(x, (3, 2), stride=stride, dilation=dilation))
    torch.testing.assert_close(anch_conv2d_ref(x, w, b, std_axis(3), std_axis(2)),
                               F.conv2d(x, w, b, stride=stride, dilation=dilation))
    if dilation == 1:
        torch.testing.assert_close(anch_pool2d_ref(x, std_axis(3), std_axis(2), "avg"),
                                   F.avg_pool2d(x, (3, 2), stride=stride))
    # s_a = d_a is the stride-1 dilated layer, whatever s_a is
    dil_axis = lambda k: (k, dilation, stride, stride)  # noqa: E731
    torch.testing.assert_close(anch_conv2d_ref(x, w, b, dil_axis(3), dil_axis(2)),
                               F.conv2d(x, w, b, dilation=dilation))


# ----------------------------------------------------------------------------- backends vs reference


def _run_backend(backend, fn, *args, **kw):
    require_backend(backend)
    out = fn(*args, backend=backend, **kw)
    assert last_backend(fn.__name__) == backend
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool_bitwise(backend, case, dtype):
    for layout in LAYOUTS if backend == "cpu" else ("non_contiguous",):
        x = make_input(case[0], dtype, layout)
        out = _run_backend(backend, anch_pool2d, x, case[1], mode="max", **kwargs(case))
        assert_bitwise_equal(out, anch_pool2d_ref(x, *axes(case)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avg_pool_within_derived_tolerance(backend, case, dtype):
    x = make_input(case[0], dtype, "channels_last" if backend == "cpu" else "contiguous")
    out = _run_backend(backend, anch_pool2d, x, case[1], mode="avg", **kwargs(case))
    ref64 = anch_pool2d_ref(x.double(), *axes(case), "avg")
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert_low_precision(out, anch_pool2d_ref(x, *axes(case), "avg"), ref64)
    else:
        k = axes(case)
        assert_within_bound(out, ref64, anch_pool2d_ref(x.double().abs(), *k, "avg"), k[0][0] * k[1][0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv_within_derived_tolerance(backend, case, dtype, with_bias):
    shape, kernel = case[0], case[1]
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, shape[1], *kernel, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    for layout in LAYOUTS if backend == "cpu" else ("non_contiguous",):
        x = make_input(shape, dtype, layout)
        out = _run_backend(backend, anch_conv2d, x, w, b, **kwargs(case))
        ay, ax = axes(case, kernel)
        ref64 = anch_conv2d_ref(x.double(), w.double(), None if b is None else b.double(), ay, ax)
        assert out.dtype == dtype
        if dtype == torch.bfloat16:
            assert_low_precision(out, anch_conv2d_ref(x, w, b, ay, ax), ref64)
        else:
            abs_ref = anch_conv2d_ref(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(),
                                      ay, ax)
            assert_within_bound(out, ref64, abs_ref, shape[1] * kernel[0] * kernel[1] + 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_max_pool_extreme_values_and_nan(backend, dtype):
    info = torch.finfo(dtype)
    x = make_input((2, 2, 9, 11), dtype, "contiguous")
    x[0, 0, 0, :4] = torch.tensor([info.max, info.min, float("inf"), float("-inf")], dtype=dtype)
    x[0, 1, 3, 3] = float("nan")
    x[1, 1, :, :] = float("-inf")
    for case in [((2, 2, 9, 11), 2, 4, 2, 2), ((2, 2, 9, 11), 3, 1, 1, 1)]:
        out = _run_backend(backend, anch_pool2d, x, case[1], mode="max", **kwargs(case))
        assert_bitwise_equal(out, anch_pool2d_ref(x, *axes(case)))
        assert torch.isnan(out).any() and torch.isinf(out).any()


@pytest.mark.parametrize("backend", ("torch", "cpu"))
def test_conv_gather_path_in_blocks(backend, monkeypatch):
    """The C++ gather + GEMM path processes output rows in blocks when the gather buffer is
    large; a tiny budget forces many blocks (including a ragged last one)."""
    import pyfastscan.ops.anchor as anchor_mod

    monkeypatch.setattr(anchor_mod, "_COL_BUDGET_BYTES", 3 * 2 * 2 * 4 * 9 * 4)
    x = make_input((2, 3, 41, 37), torch.float64, "contiguous")
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    out = _run_backend(backend, anch_conv2d, x, w, anchor_stride=4, operating_distance=2, dilation=2)
    ref = anch_conv2d_ref(x, w, None, (2, 2, 4, 2), (2, 2, 4, 2))
    abs_ref = anch_conv2d_ref(x.abs(), w.abs(), None, (2, 2, 4, 2), (2, 2, 4, 2))
    assert_within_bound(out, ref, abs_ref, 3 * 4)


# ----------------------------------------------------------------------------- backend choice


def test_auto_picks_cpp_on_cpu():
    require_backend("cpu")
    x = make_input((1, 2, 10, 10), torch.float32, "contiguous")
    anch_pool2d(x, 2, anchor_stride=4, operating_distance=2)
    assert last_backend("anch_pool2d") == "cpu"
    anch_conv2d(x, torch.randn(3, 2, 2, 2), anchor_stride=4, operating_distance=2)
    assert last_backend("anch_conv2d") == "cpu"


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("PYFASTSCAN_BACKEND", "torch")
    x = make_input((1, 2, 10, 10), torch.float32, "contiguous")
    anch_pool2d(x, 2, anchor_stride=2, operating_distance=1)
    assert last_backend("anch_pool2d") == "torch"


def test_unavailable_backend_says_why():
    x = make_input((1, 2, 10, 10), torch.float32, "contiguous")
    with pytest.raises(BackendUnavailableError, match="cuda.*CUDA"):
        anch_pool2d(x, 2, anchor_stride=2, operating_distance=1, backend="cuda")
    with pytest.raises(InvalidArgumentError, match="backend must be"):
        anch_pool2d(x, 2, anchor_stride=2, operating_distance=1, backend="gpu")


def test_fallback_is_logged_and_correct(caplog):
    require_backend("cpu")
    x = make_input((1, 2, 10, 10), torch.float64, "contiguous").requires_grad_()
    with caplog.at_level(logging.WARNING, logger="pyfastscan"):
        out = anch_pool2d(x, 2, anchor_stride=4, operating_distance=2)
    assert last_backend("anch_pool2d") == "torch"
    assert "no backward" in caplog.text
    out.sum().backward()  # the reference is differentiable
    assert x.grad is not None and x.grad.sum().item() == out.numel()


# ----------------------------------------------------------------------------- errors and edge cases


@pytest.mark.parametrize("call,message", [
    (lambda x, w: anch_pool2d(x, 0, anchor_stride=1, operating_distance=1), "kernel_size must be positive"),
    (lambda x, w: anch_pool2d(x, 2, anchor_stride=-1, operating_distance=1), "anchor_stride must be positive"),
    (lambda x, w: anch_pool2d(x, 2, anchor_stride=1, operating_distance=1, dilation=(1, 0)), "dilation"),
    (lambda x, w: anch_pool2d(x, 2.5, anchor_stride=1, operating_distance=1), "int or a pair"),
    (lambda x, w: anch_pool2d(x, 9, anchor_stride=1, operating_distance=1), "kernel larger than the input"),
    (lambda x, w: anch_pool2d(x, 3, anchor_stride=1, operating_distance=1, dilation=4), "spans 9 px"),
    (lambda x, w: anch_pool2d(x, 2, anchor_stride=1, operating_distance=1, mode="min"), "mode"),
    (lambda x, w: anch_pool2d(x[0], 2, anchor_stride=1, operating_distance=1), r"\(N, C, H, W\)"),
    (lambda x, w: anch_pool2d(x.int(), 2, anchor_stride=1, operating_distance=1), "int32"),
    (lambda x, w: anch_pool2d(x.numpy(), 2, anchor_stride=1, operating_distance=1), "torch.Tensor"),
    (lambda x, w: anch_conv2d(x, w[:, :1], anchor_stride=1, operating_distance=1), r"weight must have shape"),
    (lambda x, w: anch_conv2d(x, w[0], anchor_stride=1, operating_distance=1), r"weight must have shape"),
    (lambda x, w: anch_conv2d(x, w.double(), anchor_stride=1, operating_distance=1), "weight dtype"),
    (lambda x, w: anch_conv2d(x, w, torch.zeros(2), anchor_stride=1, operating_distance=1), r"bias must have shape"),
    (lambda x, w: anch_conv2d(x, w, torch.zeros(4, dtype=torch.float64), anchor_stride=1, operating_distance=1),
     "bias dtype"),
    (lambda x, w: anch_conv2d(x, torch.zeros(4, 3, 9, 2), anchor_stride=1, operating_distance=1), "kernel larger"),
])
def test_bad_arguments_raise_value_error(call, message):
    x = torch.zeros(1, 3, 8, 8)
    w = torch.zeros(4, 3, 2, 2)
    with pytest.raises(ValueError, match=message):
        call(x, w)


def test_mismatched_devices_raise():
    x = torch.zeros(1, 3, 8, 8)
    w = torch.zeros(4, 3, 2, 2, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        anch_conv2d(x, w, anchor_stride=1, operating_distance=1)


@pytest.mark.parametrize("backend", ("torch", "cpu", "triton"))
def test_empty_inputs_give_empty_outputs(backend):
    require_backend(backend)
    x = torch.zeros(0, 3, 12, 12)
    assert anch_pool2d(x, 2, anchor_stride=4, operating_distance=2, backend=backend).shape == (0, 3, 6, 6)
    assert anch_conv2d(x, torch.zeros(6, 3, 2, 2), anchor_stride=4, operating_distance=2,
                       backend=backend).shape == (0, 6, 6, 6)
    assert anch_pool2d(torch.zeros(2, 0, 5, 5), 2, anchor_stride=1, operating_distance=1).shape == (2, 0, 4, 4)
    no_channels = anch_conv2d(torch.zeros(1, 0, 5, 5), torch.zeros(2, 0, 2, 2), torch.tensor([1.0, -2.0]),
                              anchor_stride=1, operating_distance=1, backend=backend)
    assert no_channels.shape == (1, 2, 4, 4) and no_channels[0, :, 0, 0].tolist() == [1.0, -2.0]


# ----------------------------------------------------------------------------- modules


def test_modules_match_standard_layers():
    conv = torch.nn.Conv2d(3, 6, 3, stride=2, dilation=2).double()
    x = make_input((2, 3, 21, 18), torch.float64, "contiguous")
    anch = AnchConv2d.from_conv(conv, anchor_stride=2, operating_distance=1, dilation=2)
    assert anch.weight is conv.weight
    torch.testing.assert_close(anch(x), conv(x))
    torch.testing.assert_close(AnchPool2d(2, anchor_stride=2, operating_distance=1)(x), F.max_pool2d(x, 2))
    fresh = AnchConv2d(3, 6, (3, 2), anchor_stride=4, operating_distance=2, dilation=2, dtype=torch.float64)
    assert fresh(x).shape == (2, 6, 9, 8) and "anchor_stride=4" in repr(fresh)


# ----------------------------------------------------------------------------- CUDA dispatch (no GPU needed)


class _FakeCuda:
    """Stands in for pyfastscan._C_cuda: records launches instead of running them."""

    def __init__(self):
        self.calls = []

    def anchor_conv2d(self, *args):
        self.calls.append(("anchor_conv2d", args))

    def anchor_pool2d(self, *args):
        self.calls.append(("anchor_pool2d", args))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv_lowering_decision(case):
    """Lowered to an ordinary convolution exactly when every axis is one (d_a = 1 or
    s_a = d_a), with that convolution's stride and dilation."""
    from pyfastscan.ops.anchor import conv_lowering

    ay, ax = (AnchorAxis(*a) for a in axes(case))
    low = conv_lowering(ay, ax)
    standard = all(a.operating_distance == 1 or a.anchor_stride == a.operating_distance for a in (ay, ax))
    assert (low is not None) == standard
    if low is not None:
        (sy, sx), (dy, dx) = low
        x = make_input(case[0], torch.float64, "contiguous")
        w = torch.randn(3, case[0][1], ay.kernel, ax.kernel, dtype=torch.float64)
        torch.testing.assert_close(F.conv2d(x, w, stride=(sy, sx), dilation=(dy, dx)),
                                   anch_conv2d_ref(x, w, None, tuple(ay), tuple(ax)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[7], CASES[3], CASES[8]], ids=case_id)
def test_cuda_conv_lowers_standard_axes_to_conv2d(case, monkeypatch):
    """The cuda backend runs F.conv2d (cuDNN) for ordinary strided / dilated axes and its
    anchor kernel only otherwise; a lowered call needs no _C_cuda and may require grad."""
    from pyfastscan.ops import anchor as anchor_ops

    fake = _FakeCuda()
    monkeypatch.setattr(_native, "cuda", lambda: fake)
    monkeypatch.setattr(_native, "cuda_device_index", lambda t: 0)
    monkeypatch.setattr(anchor_ops, "_stream", lambda t: 0)
    ay, ax = (AnchorAxis(*a) for a in axes(case))
    x = make_input(case[0], torch.float64, "contiguous")
    w = torch.randn(3, case[0][1], ay.kernel, ax.kernel, dtype=torch.float64)
    out = anchor_ops.anch_conv2d_cuda(x, w, None, ay, ax)
    lowered = anchor_ops.conv_lowering(ay, ax) is not None
    assert [c[0] for c in fake.calls] == ([] if lowered else ["anchor_conv2d"])
    if lowered:
        torch.testing.assert_close(out, anch_conv2d_ref(x, w, None, tuple(ay), tuple(ax)), rtol=1e-12, atol=1e-12)
    # the device check: a lowered call on a CUDA tensor does not need _C_cuda at all
    monkeypatch.setattr(_native, "cuda", lambda: None)
    reason = anchor_ops._conv_cuda_device_reason(torch.device("cuda", 0), x, w, None, ay, ax)
    assert (reason is None) == lowered, reason
    grad_reason = anchor_ops._conv_reason(x.requires_grad_(), w, None, ay, ax)
    assert grad_reason is None if lowered else "grad" in grad_reason


def test_cuda_launchers_pass_the_tensor_device(monkeypatch):
    """Each _C_cuda launcher gets the index of the tensor's device (it makes that device
    current for the launch), right before the stream, as csrc/cuda/bindings_cuda.cpp takes it."""
    from pyfastscan.ops import anchor as anchor_ops

    fake = _FakeCuda()
    monkeypatch.setattr(_native, "cuda", lambda: fake)
    monkeypatch.setattr(_native, "cuda_device_index", lambda t: 1)
    monkeypatch.setattr(anchor_ops, "_stream", lambda t: 777)
    x = make_input((1, 2, 19, 23), torch.float32, "contiguous")
    ay, ax = (AnchorAxis(*a) for a in axes(CASES[3]))
    anchor_ops.anch_pool2d_cuda(x, ay, ax, "max")
    anchor_ops.anch_conv2d_cuda(x, torch.randn(3, 2, 2, 2), None, ay, ax)
    assert [c[0] for c in fake.calls] == ["anchor_pool2d", "anchor_conv2d"]
    assert all(args[-2:] == (1, 777) for _, args in fake.calls), fake.calls


def test_cuda_device_index_and_triton_guard():
    from pyfastscan.kernels import on_device

    class T:
        device = torch.device("cuda", 1)

    assert _native.cuda_device_index(T()) == 1
    guard = on_device(T())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(on_device(torch.zeros(1)), torch.cuda.device)


def test_cuda_binding_guards_the_device():
    """The real _C_cuda: a launcher first makes the pointers' device current. With no usable
    device here, that step fails with the device named, before any launch."""
    if _native.cuda() is None:
        pytest.skip(f"pyfastscan._C_cuda not built: {_native.cuda_error()}")
    if _native.cuda_device_error() is None:
        pytest.skip("a CUDA device is usable: this test passes null pointers")
    with pytest.raises(RuntimeError, match="anchor_pool2d: cannot make device 1 current"):
        _native.cuda().anchor_pool2d(0, 0, 0, 1, 4, 4, (2, 1, 1, 1), (2, 1, 1, 1), False, 1, 0)
    with pytest.raises(RuntimeError, match="hed_augment_u8: cannot make device 0 current"):
        _native.cuda().hed_augment_u8(0, 0, 0, 1, 16, False, 0, 0)
