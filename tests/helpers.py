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

import pytest
import torch

from pyfastscan import _native

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
