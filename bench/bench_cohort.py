"""Cohort throughput: the local engine against Ray with 1 and 2 workers (issue 16).

    .venv/bin/python bench/bench_cohort.py --json
    .venv/bin/pytest bench/bench_cohort.py -o python_files="bench_*.py" --benchmark-only

Six synthetic 2048 x 2048 px pyramidal JPEG-tiled slides, and a stand-in model whose forward only
sleeps ``DELAY_S`` per ROI (GIL released, no CPU): an accelerator of known speed, as in
bench_pipeline.py, so that two workers on this 2-core machine can show what two GPUs
would. Ray runs a local instance with 2 fake GPUs (one worker per GPU), bound to
127.0.0.1. Correctness first: every slide of every run is done, with every ROI computed,
and the maps of the three runs are equal.

Reported: the wall time of each cohort (``*_s``; Ray's includes starting its workers) and
its steady span (``*_span_s``: from the first slide's start to the last slide's finish);
``speedup_2_vs_1_steady`` = ray_1_span / ray_2_span, the throughput ratio (target >= 1.7),
and ``speedup_2_vs_1`` the same with the workers' start (paid once per cohort); the Ray
overhead per slide = (ray_1 - local) / slides, workers' start included (target <= 1 s),
and ``ray_1_overhead_steady_s_per_slide`` without it. ``*_slide_s``: one slide's time in
its worker (two workers on two cores slow each other's CPU work).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
SLIDES, SIDE, ROI_OUTPUTS = 6, 2048, 32
PATCH, STRIDE = 76, 16  # the stand-in's geometry (a stride-16 network with a 76 px patch)
DELAY_S = 0.25  # per ROI: the stand-in accelerator


from pyfastscan.dense import DenseModel, Geometry  # noqa: E402


class StandInDense(DenseModel):
    """A DenseModel that sleeps ``delay`` per forward and returns zeros of the map's shape."""

    def __init__(self, delay: float):
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Conv2d(3, 2, 1)), Geometry(PATCH, STRIDE, 1), "stand-in")
        self.delay = delay

    def forward(self, x):
        g = self.geometry
        time.sleep(self.delay)
        return torch.zeros(x.shape[0], 2, g.output_side(x.shape[-2]), g.output_side(x.shape[-1]))


def stand_in(delay: float = DELAY_S) -> StandInDense:
    return StandInDense(delay)


def build(folder: str, k: int) -> str:
    """A pyramidal (as slides are: the tissue mask reads a small level) JPEG-tiled TIFF of
    2048 x 2048 px at 0.5 um/px, white but for a 1500 px square of random tissue."""
    from pyfastscan.pipeline.outputs import write_pyramid_tif

    img = np.full((SIDE, SIDE, 3), 245, np.uint8)
    rng = np.random.default_rng(k)
    img[200:1700, 300:1800] = rng.integers(60, 200, (1500, 1500, 3), dtype=np.uint8)
    return write_pyramid_tif(os.path.join(folder, f"slide{k}.tif"), img, 0.5, compression="jpeg")


def span(out: str) -> float:
    """Seconds from the first slide's start to the last slide's finish (cohort.jsonl)."""
    from pyfastscan.cohort import COHORT_EVENTS

    with open(os.path.join(out, COHORT_EVENTS)) as f:
        ev = [json.loads(ln) for ln in f if ln.strip()]
    return max(e["time"] for e in ev if e["event"] == "finish") - min(e["time"] for e in ev if e["event"] == "start")


def run(folder: str) -> dict:
    from pyfastscan.benchmark import cores, cpu_name
    from pyfastscan.cohort import scan_cohort
    from pyfastscan.pipeline.distributed import import_ray

    slides = [build(folder, k) for k in range(SLIDES)]
    kw = dict(alpha=1, roi_outputs=ROI_OUTPUTS, precision="fp32", progress=False, heatmap_dtype="float32")
    result, maps = {}, {}

    def cohort(name, **engine):
        out = os.path.join(folder, name)
        t = time.perf_counter()
        res = scan_cohort(slides, stand_in(), out, **engine, **kw)
        wall = time.perf_counter() - t
        assert res.exit_status == 0 and all(r.status == "done" for r in res.records), [r.error for r in res.records]
        assert all(r.rois_resumed == 0 and r.rois_computed > 0 for r in res.records)
        import tifffile

        maps[name] = [tifffile.imread(os.path.join(r.folder, "heatmap.tif"), key=0) for r in res.records]
        result[f"{name}_s"], result[f"{name}_span_s"] = wall, span(out)
        result["rois_per_slide"] = res.records[0].rois_computed
        result[f"{name}_slide_s"] = sum(r.seconds for r in res.records) / len(res.records)  # one slide, in its worker

    cohort("local")
    ray = import_ray(local_only=True)  # bound to 127.0.0.1 only

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = HERE + (os.pathsep + old if old else "")  # workers import this module
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        cohort("ray_1", engine="ray", workers=1, cpus_per_worker=0.5)
        cohort("ray_2", engine="ray", workers=2, cpus_per_worker=0.5)
    finally:
        ray.shutdown()
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    for name in ("ray_1", "ray_2"):
        assert all(np.array_equal(a, b) for a, b in zip(maps["local"], maps[name])), f"{name} maps != local"
    result.update(
        slides=SLIDES, delay_per_roi_s=DELAY_S,
        device_s_per_slide=DELAY_S * result["rois_per_slide"],
        speedup_2_vs_1=result["ray_1_s"] / result["ray_2_s"],
        speedup_2_vs_1_steady=result["ray_1_span_s"] / result["ray_2_span_s"],
        ray_1_overhead_s_per_slide=(result["ray_1_s"] - result["local_s"]) / SLIDES,
        ray_1_overhead_steady_s_per_slide=(result["ray_1_span_s"] - result["local_span_s"]) / SLIDES,
        cpu=cpu_name(), cores=cores(), ray=ray.__version__, torch=torch.__version__,
        python=platform.python_version())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyfastscan-bench-cohort-") as folder:
        result = run(folder)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>34}: {v:.3f}" if isinstance(v, float) else f"{k:>34}: {v}")
    # throughput is the steady state; the workers' start (once per cohort) is reported beside it
    ok = result["speedup_2_vs_1_steady"] >= 1.7 and result["ray_1_overhead_s_per_slide"] <= 1.0
    return 0 if ok else 1


def test_cohort(benchmark):
    import pytest

    pytest.importorskip("ray")
    pytest.importorskip("openslide")
    benchmark.group = "cohort: local vs Ray 1 and 2 workers (stand-in accelerator)"
    with tempfile.TemporaryDirectory(prefix="pyfastscan-bench-cohort-") as folder:
        result = benchmark.pedantic(lambda: run(folder), rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(result)
    print(f"\n{json.dumps(result)}")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    raise SystemExit(main())
