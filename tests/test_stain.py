"""H&E deconvolution and fused stain augmentation: every backend against the reference,
the reference against scikit-image (DESIGN.md 3, 5).

Float tolerance, derived: the kernels evaluate rgb'_j = exp(e_j), e_j = sum_i l_i M_ij + k_j,
l_i = ln(max(P_i, 1e-6)), in the image's precision u. ln and exp each add at most U ulps of
relative error (U = 4: glibc's vector libm documents <= 4 ulp, the scalar one and CUDA's
<= 2), the inputs M, k are rounded once, and the sum of four terms adds gamma_4, so
|e_err| <= (U*u + u + gamma_4) * (sum_i |l_i| |M_ij| + |k_j|) and the result is off by at
most rgb' * (|e_err| + U*u) relative; the float64 reference adds the same in float64.
"""
import numpy as np
import pytest
import torch

from helpers import UNIT_ROUNDOFF, gamma, require_backend
from pyfastscan import InvalidArgumentError
from pyfastscan.nn import HEDAugment
from pyfastscan.ops import hed_augment, hed_to_rgb, last_backend, rgb_to_hed, sample_hed_params
from pyfastscan.ops.stain import fused_params
from pyfastscan.reference.stain import hed_augment_ref
from pyfastscan.samples import carcinoma_image, sample_path

BACKENDS = ("torch", "cpu", "triton")
ULPS = 4


def _sample_image() -> torch.Tensor:
    """The real H&E patch (1000 x 1000 RGB, channel-last uint8); see pyfastscan/data/PROVENANCE.md."""
    sample_path("he_carcinoma_1000px.png", verify=True)
    return torch.from_numpy(carcinoma_image())


def _params(n, sigma=0.05, seed=0):
    return sample_hed_params(n, sigma, torch.Generator().manual_seed(seed))


def _random_image(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


def _ref64(x, alpha, beta, channels_last):
    """float64 reference in [0, 1], channel-last (N, H, W, 3)."""
    hwc = x if channels_last else x.movedim(1, -1)
    p = hwc.double() / 255 if x.dtype == torch.uint8 else hwc.double()
    return hed_augment_ref(p, alpha.double(), beta.double())


def _float_bound(x, alpha, beta, channels_last, dtype):
    hwc = (x if channels_last else x.movedim(1, -1)).double()
    m, k = fused_params(alpha, beta, False)[:2]
    lab = torch.log(torch.clamp(hwc, min=1e-6)).abs()  # (N, H, W, 3)
    mag = torch.einsum("nhwi,nij->nhwj", lab, m.abs()) + k.abs()[:, None, None, :]
    y = _ref64(x, alpha, beta, channels_last)
    per = lambda d: (ULPS + 1) * UNIT_ROUNDOFF[d] + gamma(4, d)  # noqa: E731
    return y * ((per(dtype) + per(torch.float64)) * mag + ULPS * (UNIT_ROUNDOFF[dtype] + UNIT_ROUNDOFF[torch.float64]))


def _run(backend, *args, **kw):
    require_backend(backend)
    out = hed_augment(*args, backend=backend, **kw)
    assert last_backend("hed_augment") == backend
    return out


def _check_u8(out, ref01, channels_last):
    """uint8: never more than 1 level from the float64 reference, identical on >= 99.9%."""
    ref = torch.round(ref01 * 255)
    got = (out if channels_last else out.movedim(1, -1)).double()
    diff = (got - ref).abs()
    assert diff.max().item() <= 1, f"off by {diff.max().item()} levels"
    same = (diff == 0).double().mean().item()
    assert same >= 0.999, f"only {same:.5f} of values identical to the reference"


# ----------------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 16, 9), (2, 1, 1)], ids=str)
def test_uint8_matches_reference(backend, channels_last, shape):
    n, h, w = shape
    x = _random_image((n, h, w, 3) if channels_last else (n, 3, h, w), torch.uint8, seed=n + h)
    alpha, beta = _params(n, sigma=0.3)  # strong, to move many pixels
    out = _run(backend, x, alpha, beta, channels_last=channels_last)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    _check_u8(out, _ref64(x, alpha, beta, channels_last), channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
def test_uint8_same_bits_on_every_backend(channels_last):
    """The kernels share the tables and the order of the products (csrc/include/hed.h)."""
    x = _sample_image()[:200, :300]
    x = (x if channels_last else x.permute(2, 0, 1)).contiguous()[None]
    alpha, beta = _params(1, sigma=0.2, seed=3)
    outs = {}
    for backend in ("cpu", "triton"):
        require_backend(backend)
        outs[backend] = hed_augment(x, alpha, beta, channels_last=channels_last, backend=backend)
    assert torch.equal(outs["cpu"], outs["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
def test_float_within_derived_bound(backend, dtype, channels_last):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel takes uint8 and float32")
    n, h, w = 2, 23, 31
    x = _random_image((n, h, w, 3) if channels_last else (n, 3, h, w), dtype, seed=5)
    x.view(-1)[:7] = torch.tensor([0.0, 1.0, 1e-7, 1e-6, 0.5, 1.0, 0.0], dtype=dtype)  # edges of the clamps
    alpha, beta = _params(n, sigma=0.3, seed=1)
    out = _run(backend, x, alpha, beta, channels_last=channels_last)
    assert out.dtype == dtype
    got = (out if channels_last else out.movedim(1, -1)).double()
    err = (got - _ref64(x, alpha, beta, channels_last)).abs()
    bound = _float_bound(x, alpha, beta, channels_last, dtype)
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_returns_uint8_input_bit_for_bit(backend):
    grey = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[None, :, :, None]  # all 256 grey levels
    colours = _random_image((2, 3, 41, 17), torch.uint8, seed=7)
    extremes = torch.tensor([[a, b, c] for a in (0, 255) for b in (0, 255) for c in (0, 255)],
                            dtype=torch.uint8).T[None, :, :, None]
    for x in (grey, colours, extremes):
        out = _run(backend, x, torch.ones(x.shape[0], 3), torch.zeros(x.shape[0], 3))
        assert torch.equal(out, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_pixels_and_strong_parameters(backend):
    x = torch.tensor([[a, b, c] for a in (0, 1, 254, 255) for b in (0, 255) for c in (0, 128, 255)],
                     dtype=torch.uint8)[None, None]  # (1, 1, 24, 3)
    for alpha, beta in (([1.5, 0.5, 1.0], [0.5, -0.5, 0.2]), ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
                        ([2.0, 2.0, 2.0], [-1.0, 1.0, 0.0])):
        a, b = torch.tensor([alpha]), torch.tensor([beta])
        out = _run(backend, x, a, b, channels_last=True)
        _check_u8(out, _ref64(x, a.double(), b.double(), True), True)


def test_in_place_and_single_image():
    require_backend("cpu")
    x = _random_image((3, 20, 30), torch.uint8, seed=2)
    alpha, beta = _params(1, seed=4)
    expected = hed_augment(x, alpha[0], beta[0], backend="torch")
    assert expected.shape == x.shape
    y = x.clone()
    assert hed_augment(y, alpha[0], beta[0], backend="cpu", out=y) is y
    assert torch.equal(y, expected)


def test_sampling_is_reproducible_and_in_range():
    a1, b1 = _params(64, sigma=0.05, seed=9)
    a2, b2 = _params(64, sigma=0.05, seed=9)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and a1.shape == (64, 3)
    assert ((a1 - 1).abs() <= 0.05).all() and (b1.abs() <= 0.05).all()
    assert a1.std() > 0.01 and b1.std() > 0.01  # actually random


def test_module_draws_per_image_and_keeps_layout():
    require_backend("cpu")
    x = _random_image((4, 3, 16, 16), torch.uint8, seed=6)
    aug = HEDAugment(sigma=0.1, generator=torch.Generator().manual_seed(0))
    out = aug(x)
    alpha, beta = sample_hed_params(4, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out, hed_augment(x, alpha, beta))
    assert not torch.equal(out[0], out[1]) or not torch.equal(x[0], x[1])
    assert torch.equal(HEDAugment(sigma=0.0)(x), x)  # sigma 0: identity


# ----------------------------------------------------------------------------- scikit-image


def test_matches_scikit_image_on_real_sample():
    skimage_color = pytest.importorskip("skimage.color")
    img = _sample_image()  # (H, W, 3) uint8
    ours = rgb_to_hed(img.double() / 255, clamp=True, channels_last=True)
    theirs = skimage_color.rgb2hed(img.numpy())
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12, atol=1e-12)
    ours_u8 = rgb_to_hed(img, clamp=True, channels_last=True)  # uint8 in: float32 densities
    np.testing.assert_allclose(ours_u8.numpy(), theirs, rtol=0, atol=1e-5)
    back = hed_to_rgb(torch.from_numpy(theirs), channels_last=True)
    np.testing.assert_allclose(back.numpy(), skimage_color.hed2rgb(theirs), rtol=1e-12, atol=1e-12)
    # augmentation = skimage's rgb2hed (unclamped, as in augmentation), scale, hed2rgb
    alpha, beta = _params(1, sigma=0.05, seed=11)
    od = np.log(np.maximum(img.numpy() / 255.0, 1e-6)) / np.log(1e-6)
    hed = od @ skimage_color.hed_from_rgb
    expected = skimage_color.hed2rgb(hed * alpha.numpy() + beta.numpy())
    out = hed_augment(img.permute(2, 0, 1).contiguous(), alpha, beta)  # planar uint8, auto backend
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(int) - np.round(expected * 255))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


def test_rgb_to_hed_layouts_and_white():
    x = _random_image((2, 3, 5, 7), torch.float32)
    planar = rgb_to_hed(x)
    last = rgb_to_hed(x.permute(0, 2, 3, 1), channels_last=True)
    assert torch.allclose(planar.permute(0, 2, 3, 1), last)
    white = rgb_to_hed(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    assert torch.equal(white, torch.zeros(3, 2, 2))
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), torch.clamp(x, min=1e-6), atol=1e-5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,message", [
    (lambda x, a, b: hed_augment(x[:, :2], a, b), "3 channels"),
    (lambda x, a, b: hed_augment(x, a, b, channels_last=True), "3 channels"),
    (lambda x, a, b: hed_augment(x.int(), a, b), "int32"),
    (lambda x, a, b: hed_augment(x[0, 0], a, b), "shape"),
    (lambda x, a, b: hed_augment(x.numpy(), a, b), "torch.Tensor"),
    (lambda x, a, b: hed_augment(x, a[:1], b), r"alpha must have shape \(2, 3\)"),
    (lambda x, a, b: hed_augment(x, a, b[:, :2]), r"beta must have shape"),
    (lambda x, a, b: hed_augment(x, a * float("nan"), b), "alpha must be finite"),
    (lambda x, a, b: hed_augment(x, a, "x"), "beta must be a tensor"),
    (lambda x, a, b: hed_augment(x, a, b, out=torch.empty(2, 3, 4, 4)), "out must be"),
    (lambda x, a, b: sample_hed_params(2, sigma=1.5), "sigma"),
    (lambda x, a, b: hed_to_rgb(x), "float32"),
])
def test_bad_input_names_what_was_received(call, message):
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    a, b = _params(2)
    with pytest.raises(InvalidArgumentError, match=message):
        call(x, a, b)
    assert issubclass(InvalidArgumentError, ValueError)
