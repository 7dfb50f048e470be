"""Dense tellez_cnn (gamma 0.6) throughput for the mitosis job (issue 7).

    .venv/bin/pytest bench/bench_mitosis.py --benchmark-only --benchmark-json=mitosis.json
    .venv/bin/python bench/report.py mitosis.json

One ROI of L_m' = 128 map cells a side at alpha 1 (the network's own 4 px stride): the
ROI covers (128 * 4)^2 px of tissue. For fp32 and bf16 (channels_last): megapixels of
tissue per second, achieved GFLOP/s (2 x the multiply-adds counted from the layers'
shapes), and that as a fraction of this machine's bf16 matrix-multiply peak, measured in
the same run (torch.mm of 4096 x 4096 bfloat16 matrices; fp32 too for reference).
Target: at least 50% of the bf16 peak. The report also gives the time per cm^2 of tissue
at 0.25 um/px (1600 Mpx).
"""
import pytest
import torch

from pyfastscan import to_dense
from pyfastscan.models import tellez_cnn

L = 128
N_MM = 4096


def _info(benchmark, provider, **kw):
    benchmark.group = f"mitosis tellez_cnn gamma 0.6, alpha 1, L_m={L}"
    benchmark.extra_info.update(suite="mitosis", provider=provider, **kw)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_matmul_peak(benchmark, dtype):
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(N_MM, N_MM, dtype=dt), torch.randn(N_MM, N_MM, dtype=dt)
    torch.mm(a, b)
    _info(benchmark, f"matmul {dtype}", flops=2 * N_MM ** 3)
    benchmark.pedantic(lambda: torch.mm(a, b), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_dense_tellez(benchmark, precision):
    torch.manual_seed(0)
    dense = to_dense(tellez_cnn(gamma=0.6).eval(), 1, precision=precision)
    g = dense.geometry
    side = g.input_side(L)
    x = torch.rand(1, 3, side, side)
    with torch.inference_mode():
        out = dense(x)
        assert out.shape[-2:] == (L, L) and torch.isfinite(out).all()
        _info(benchmark, f"dense {precision}", flops=2 * dense.multiply_adds(side),
              megapixels=(L * g.step) ** 2 / 1e6, input_side=side)
        benchmark.pedantic(lambda: dense(x), rounds=3, warmup_rounds=1)
