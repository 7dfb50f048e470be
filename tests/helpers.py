"""Shared test helpers: devices, backends, dtypes and the one tolerance table.

Tolerances are derived, not tuned (DESIGN.md 5):

* float32 / float64: a sum of n products evaluated in any order in precision u obeys
  |fl(s) - s| <= gamma_n * sum |terms|, gamma_n = n*u / (1 - n*u) (Higham, Accuracy and
  Stability of Numerical Algorithms, 2nd ed., section 3.1). Each product adds one rounding
  and a final scale (average pooling: times the rounded 1/K^2) two more, so we use
  gamma_{n+2} with ``abs_ref`` = the same op on |x|, |w|, |b| in float64, plus the same
  bound in float64 for the reference itself.
* bfloat16 (low precision): at most 2x the error of PyTorch's own path in bfloat16,
  both measured against the float64 reference of the same (bf16-rounded) inputs.
* max pooling and integer results: bitwise equal.
"""
import os
import shutil
import time

import numpy as np
import pytest
import torch
from torch import nn

from pyfastscan import _native
from pyfastscan.dense import DenseModel

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def gamma(n: int, dtype: torch.dtype) -> float:
    u = UNIT_ROUNDOFF[dtype]
    return n * u / (1 - n * u)


def backend_skip_reason(backend: str, device: str = "cpu"):
    """Why ``backend`` cannot run on ``device`` in this test session, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "cpu" and _native.cpu() is None:
        return f"pyfastscan._C not built: {_native.cpu_error()}"
    if backend == "cuda" and (device != "cuda" or _native.cuda() is None):
        return "CUDA kernels need a CUDA device and pyfastscan._C_cuda"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton not installed"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "TRITON_INTERPRET is not 1"
    if backend == "numba":
        from pyfastscan.backends import numba_reason

        return numba_reason(torch.device(device))
    return None


def require_backend(backend: str, device: str = "cpu"):
    reason = backend_skip_reason(backend, device)
    if reason:
        pytest.skip(reason)


def nvcc_present() -> bool:
    return shutil.which("nvcc") is not None


def _where(mask: torch.Tensor, actual, expected, limit=None) -> str:
    idx = mask.nonzero()[:5].tolist()
    rows = []
    for i in idx:
        t = tuple(i)
        lim = "" if limit is None else f" (allowed {float(limit[t]):.3g})"
        rows.append(f"  at {t}: got {actual[t].item()!r}, expected {expected[t].item()!r}{lim}")
    return f"{int(mask.sum())} of {mask.numel()} elements differ, first:\n" + "\n".join(rows)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Equal shapes, dtypes and bits (NaN where the reference has NaN)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    differ = (nan_a != nan_e) | (~nan_e & (a.view(_int_view(a)) != e.view(_int_view(e))))
    assert not differ.any(), _where(differ, a, e)


def _int_view(t):
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]


def assert_within_bound(actual: torch.Tensor, ref64: torch.Tensor, abs_ref: torch.Tensor, n_terms: int):
    """|actual - ref64| <= (gamma_{n+2}(dtype) + gamma_{n+2}(f64)) * abs_ref, elementwise."""
    assert actual.shape == ref64.shape, f"shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    limit = (gamma(n_terms + 2, actual.dtype) + gamma(n_terms + 2, torch.float64)) * abs_ref.double().cpu()
    err = (actual.detach().double().cpu() - ref64.double().cpu()).abs()
    bad = err > limit
    assert not bad.any(), _where(bad, actual.detach().double().cpu(), ref64.double().cpu(), limit)


def assert_low_precision(actual: torch.Tensor, torch_path: torch.Tensor, ref64: torch.Tensor):
    """DESIGN.md 5: max error of ``actual`` at most 2x the max error of PyTorch's own path."""
    ref = ref64.double().cpu()
    ours = (actual.detach().double().cpu() - ref).abs().max().item()
    theirs = (torch_path.detach().double().cpu() - ref).abs().max().item()
    assert ours <= 2 * theirs, f"max error {ours:.4g} exceeds 2x PyTorch's own {actual.dtype} path ({theirs:.4g})"


# ----------------------------------------------------------------------------- dense scanning

# Lipschitz constants (sup |f'|) of the pointwise layers, for error propagation.
_LIPSCHITZ = {"ReLU": 1.0, "LeakyReLU": 1.0, "ELU": 1.0, "GELU": 1.13, "SiLU": 1.1, "Sigmoid": 0.25, "Tanh": 1.0,
              "Softmax": 1.0}


def patch_loop(model, x: torch.Tensor, patch: int, step: int, batch: int = 256) -> torch.Tensor:
    """The literal patch-by-patch scan: model applied to every patch x[..., i*step : i*step+patch, ...]
    on its own. Returns (N, K, ny, nx)."""
    n, _, h, w = x.shape
    ny, nx = (h - patch) // step + 1, (w - patch) // step + 1
    crops = [x[:, :, i * step:i * step + patch, j * step:j * step + patch] for i in range(ny) for j in range(nx)]
    outs = []
    with torch.no_grad():
        for k in range(0, len(crops), batch):
            chunk = torch.cat(crops[k:k + batch])  # (b*N, C, patch, patch)
            y = model(chunk)
            outs.append(y.reshape(-1, n, *y.shape[1:]).flatten(2))  # (b, N, K)
    y = torch.cat(outs)  # (ny*nx, N, K)
    return y.permute(1, 2, 0).reshape(n, y.shape[-1], ny, nx)


def network_error_bound(layers, x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |f_dtype(x) - f(x)| (f exact) for a patch batch, propagated layer by
    layer: a conv adds gamma_{n+2} * (|W| * |a| + |b|) to |W| * (incoming error); max pooling
    passes the largest incoming error; average pooling averages it and adds its own summation
    error; a pointwise layer scales it by its Lipschitz constant and adds two roundings.
    ``layers`` is the normalised list of pyfastscan.dense._flatten (BatchNorm folded)."""
    import torch.nn.functional as F

    u = UNIT_ROUNDOFF[dtype]
    a, e = x64, torch.zeros_like(x64)
    with torch.no_grad():
        for layer in layers:
            m = layer.module
            k, s, d = layer.kernel, layer.stride, layer.dilation
            if layer.kind == "conv":
                w = m.weight.double()
                b = None if m.bias is None else m.bias.double()
                n = w[0].numel() + 1
                e = F.conv2d(e, w.abs(), None, s, 0, d) + gamma(n + 2, dtype) * F.conv2d(
                    a.abs(), w.abs(), None if b is None else b.abs(), s, 0, d)
                a = F.conv2d(a, w, b, s, 0, d)
            elif layer.kind == "max":
                e, a = F.max_pool2d(e, k, s, 0, d), F.max_pool2d(a, k, s, 0, d)
            elif layer.kind == "avg":
                e = F.avg_pool2d(e, k, s) + gamma(k * k + 2, dtype) * F.avg_pool2d(a.abs(), k, s)
                a = F.avg_pool2d(a, k, s)
            else:
                a = m.double()(a)
                e = _LIPSCHITZ[type(m).__name__] * e + 2 * u * a.abs()
    return e


def assert_dense_equals_patch_loop(model, dense, x: torch.Tensor):
    """DESIGN.md 2.2 for one input: the dense map equals the literal patch loop, within twice
    the propagated rounding bound of the input's dtype (both evaluate the same sums)."""
    from pyfastscan.dense import _flatten

    g = dense.geometry
    with torch.no_grad():
        out = dense(x)
    loop = patch_loop(model, x, g.patch, g.step)
    assert out.shape == loop.shape, f"dense map {tuple(out.shape)} != patch loop {tuple(loop.shape)}"
    crops = [x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch].double()
             for i in range(loop.shape[2]) for j in range(loop.shape[3])]
    bound = network_error_bound(_flatten(model), torch.cat(crops), x.dtype)  # (ny*nx*N, K, 1, 1)
    bound = bound.reshape(len(crops), x.shape[0], -1).permute(1, 2, 0).reshape(loop.shape)
    err = (out.double() - loop.double()).abs()
    bad = err > 2 * bound
    assert not bad.any(), _where(bad, out.double(), loop.double(), 2 * bound)


def seeded(model, seed=0, dtype=torch.float64):
    """He-initialised convolutions and Linear layers, small random biases, BatchNorm
    statistics away from the identity; ``dtype``, eval mode. One recipe for every test."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=(2.0 / m.weight[0].numel()) ** 0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0, 0.2)
    return model.to(dtype).eval()


class ArraySlide:
    """An in-memory slide with OpenSlide's reading interface (a pyramid of 1 level)."""

    def __init__(self, rgb: np.ndarray, mpp=0.5):
        self.rgb = rgb
        self.level_dimensions = [(rgb.shape[1], rgb.shape[0])]
        self.level_downsamples = [1.0]
        self.properties = {} if mpp is None else {"openslide.mpp-x": str(mpp)}
        self.name = "array-slide"

    def read_region(self, location, level, size):
        (x, y), (w, h) = location, size
        out = np.zeros((h, w, 4), dtype=np.uint8)  # transparent outside the image
        src = self.rgb[max(0, y):y + h, max(0, x):x + w]
        out[max(0, -y):max(0, -y) + src.shape[0], max(0, -x):max(0, -x) + src.shape[1], :3] = src
        out[max(0, -y):max(0, -y) + src.shape[0], max(0, -x):max(0, -x) + src.shape[1], 3] = 255
        return out


def unwritable_folder(tmp_path):
    """A path no one can create a folder at: below a regular file when running as root
    (root writes anywhere), else inside a read-only folder."""
    import os

    if os.geteuid() == 0:
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        return blocker / "out"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


class SlowDense(DenseModel):
    """A DenseModel that sleeps ``delay`` seconds in every forward, then computes the real
    map of ``dense``: a slide that takes long enough to be interrupted from a test (the
    cohort tests kill its Ray worker midway). Importable by Ray workers (tests/ is on their
    path)."""

    def __init__(self, dense, delay: float):
        super().__init__(dense.layers, dense.geometry, dense.plan, dense.precision, dense.group,
                         dense.ends_with_softmax)
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return super().forward(x)
