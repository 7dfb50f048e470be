"""Mitosis candidate detector: the C++ kernel against the reference loop, on the real
sample patch (1000 x 1000 px at 0.25 um/px, d = 25 um, t = 0.6).

    .venv/bin/pytest bench/bench_candidates.py --benchmark-only --benchmark-json=cand.json
    .venv/bin/python bench/report.py cand.json
"""
import numpy as np
import pytest

from pyfastscan.ops import candidates
from pyfastscan.samples import carcinoma_image

IMG = carcinoma_image()[..., :3]


@pytest.mark.parametrize("provider", ["torch", "cpu"])
def test_candidates(benchmark, provider):
    benchmark.group = "mitosis candidates, 1000 x 1000 px, d 25 um at 0.25 um/px"
    benchmark.extra_info.update(provider=provider, megapixels=IMG.shape[0] * IMG.shape[1] / 1e6)
    got = candidates(IMG, mpp=0.25, backend=provider)
    if provider == "cpu":  # the kernel equals the reference before it is timed
        assert np.array_equal(got, candidates(IMG, mpp=0.25, backend="torch"))
    benchmark.extra_info["candidates"] = int(len(got))
    benchmark.pedantic(lambda: candidates(IMG, mpp=0.25, backend=provider), rounds=3, warmup_rounds=0)
