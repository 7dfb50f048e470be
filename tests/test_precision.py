"""precision="auto": bf16 where the hardware runs it fast, fp32 otherwise; true fp32 on CUDA."""
import numpy as np
import pytest
import torch

from pyfastscan import precision as P
from pyfastscan import scan_slide
from pyfastscan.errors import InvalidArgumentError


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given flags (auto_precision's per-process cache cleared)."""
    def set_flags(*names):
        monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(names))
        P.auto_precision.cache_clear()

    yield set_flags
    P.auto_precision.cache_clear()


def test_auto_on_cpus_with_and_without_amx(flags):
    flags("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    assert P.resolve_precision("auto", "cpu")[0] == "bf16"
    flags("avx2", "fma", "avx512_bf16")  # bf16 instructions without AMX tiles: still slower than fp32
    prec, why = P.resolve_precision("auto", "cpu")
    assert prec == "fp32" and "no AMX" in why
    assert P.resolve_precision("bf16", "cpu") == ("bf16", "requested")


def test_auto_on_cuda_follows_compute_capability(monkeypatch):
    for cap, want in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0, cap=cap: cap)
        P.auto_precision.cache_clear()
        assert P.resolve_precision("auto", "cuda:0")[0] == want
    P.auto_precision.cache_clear()


def test_this_machine_is_named_and_decided():
    prec, why = P.resolve_precision("auto", "cpu")
    assert prec == ("bf16" if {"amx_bf16", "amx_tile"} <= P.cpu_flags() else "fp32") and why


def test_bad_precision():
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        P.resolve_precision("fp16", "cpu")


def test_tf32_off_for_fp32_on_cuda_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with P.tf32_mode("cuda:0", allow=False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with P.tf32_mode("cpu", allow=False):  # nothing to change off CUDA
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_scan_default_runs_what_auto_says_and_reports_it(flags):
    from helpers import ArraySlide
    from test_scan import _image, _model

    img = _image()
    for names, want in ((("amx_bf16", "amx_tile"), "bf16"), (("avx2",), "fp32")):
        flags(*names)
        res = scan_slide(ArraySlide(img), _model(torch.float32), alpha=1, progress=False, roi_outputs=8)
        assert res.geometry["precision"] == want == res.model["precision"]
        assert res.model["precision_reason"]
        if want == "fp32":  # float32 on the CPU: the layout it ran in, and why
            assert res.model["layout"] in ("nchw", "channels_last") and res.model["layout_reason"]
        else:
            assert "layout" not in res.model
    assert np.isfinite(res.heatmap).all()
