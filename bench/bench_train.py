"""Training throughput with and without the augmentations, and mining time against a patch loop.

    .venv/bin/pytest bench/bench_train.py --benchmark-only --benchmark-json=train.json
    .venv/bin/python bench/report.py train.json
    .venv/bin/python bench/bench_train.py [THREADS]   # the same measurements, ratios printed

Providers, one run, the same batches:

- ``step``: one training step (augmentation on the batch + forward + backward + Adam) of
  Tellez's CNN (gamma 0.6, 128 px contexts cropped to 100 px, batch 32) and of the demo CNN
  (50 -> 38 px, batch 64), with the model's preset (``tellez_rcsehbg``, ``fastscannet``)
  and with ``none`` (the centre crop only). The augmentation's share of the step is
  (augmented - plain) / augmented; the target is at most 15% on the CPU.
- ``mine``: :func:`pyfastscan.train.mine_slide` on the demo's training slide (a dense scan
  at 1 um/px plus the selection), against the time a patch loop would need for the same
  map cells: the demo CNN on batches of 256 patches, timed, times the number of cells.

Correctness first: the augmented batch is finite and in [0, 1]; 64 mined cells' map values
equal the patch classifier on their patches (float32 bound of DESIGN.md 5).
"""
import statistics
import sys
import tempfile
import time

import pytest
import torch

from pyfastscan.models import create
from pyfastscan.train import Augment, PatchDataset, mine_slide, read_manifest

CASES = {"tellez_cnn": dict(kwargs={"gamma": 0.6}, patch=100, context=128, batch=32, preset="tellez_rcsehbg"),
         "demo_cnn": dict(kwargs={}, patch=38, context=50, batch=64, preset="fastscannet")}
_SLIDES = {}


def _manifest():
    if "m" not in _SLIDES:
        from pyfastscan.demo_train import build_training_slides

        _SLIDES["m"] = build_training_slides(tempfile.mkdtemp(prefix="bench_train_"))
    return _SLIDES["m"]


def _batch(case):
    c = CASES[case]
    specs = read_manifest(_manifest())
    ds = PatchDataset(specs, 1.0, c["patch"], context=c["context"], split="train", length=c["batch"])
    items = [ds[i] for i in range(c["batch"])]  # each patch read once
    x = torch.stack([item[0] for item in items])
    y = torch.stack([item[1] for item in items])
    return x, y


def make_step(case, preset, augment_only=False):
    """A closure running one training step (or only its augmentation); checks its
    augmented batch first."""
    c = CASES[case]
    torch.manual_seed(0)
    model = create(case, **c["kwargs"]).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    aug = Augment(preset, patch=c["patch"])
    x, y = _batch(case)
    g = torch.Generator().manual_seed(0)
    a = aug(x, g)
    assert a.shape == (len(x), 3, c["patch"], c["patch"]) and torch.isfinite(a).all()
    assert float(a.min()) >= 0 and float(a.max()) <= 1

    if augment_only:
        return lambda: aug(x, g)

    def step():
        out = model(aug(x, g)).flatten(2).mean(2)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["augmented", "plain"])
def test_step(benchmark, case, provider):
    c = CASES[case]
    benchmark.group = f"train step {case} batch {c['batch']}"
    benchmark.extra_info.update(provider=provider, preset=c["preset"] if provider == "augmented" else "none",
                                patches=c["batch"])
    step = make_step(case, c["preset"] if provider == "augmented" else "none")
    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


def make_mining():
    """(mine closure, number of map cells, patch-loop seconds per patch), checked."""
    specs = read_manifest(_manifest())
    torch.manual_seed(0)
    model = create("demo_cnn").eval()
    spec = specs[0]
    m = mine_slide(model, spec, mpp=1.0, threshold=0.0)  # every negative cell, to check them
    from pyfastscan.slide import open_slide

    s = open_slide(spec.slide)
    img = torch.from_numpy(s.read(0, 0, *s.dimensions)).permute(2, 0, 1).float() / 255
    s.close()
    pick = torch.randperm(len(m.xy), generator=torch.Generator().manual_seed(0))[:64]
    with torch.no_grad():
        for k in pick.tolist():
            x, y = (int(round(v - 19)) for v in m.xy[k])
            p = torch.softmax(model(img[None, :, y:y + 38, x:x + 38]).flatten(1), 1)[0, 1].item()
            # float32: a 4-layer net of <= 289-term sums: errors ~1e-5, far below 1e-3
            assert abs(p - m.probability[k]) < 1e-3, (k, p, m.probability[k])
    w, h = img.shape[2], img.shape[1]
    cells = ((h - 38) // 8 + 1) * ((w - 38) // 8 + 1)
    patches = torch.rand(256, 3, 38, 38)
    with torch.no_grad():
        model(patches)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(patches)
            t.append(time.perf_counter() - t0)
    per_patch = statistics.median(t) / 256
    return (lambda: mine_slide(model, spec, mpp=1.0, threshold=0.5)), cells, per_patch


def test_mine(benchmark):
    run, cells, per_patch = make_mining()
    benchmark.group = "mining one slide"
    benchmark.extra_info.update(provider="dense mine_slide", cells=cells,
                                patch_loop_estimate_s=cells * per_patch)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def _median(f, n=5):
    f()
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    return statistics.median(t), min(t), max(t)


def main(argv=None) -> int:
    import platform

    argv = sys.argv[1:] if argv is None else argv
    if argv:
        torch.set_num_threads(int(argv[0]))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for case, c in CASES.items():
        aug, lo_a, hi_a = _median(make_step(case, c["preset"]))
        plain, lo_p, hi_p = _median(make_step(case, "none"))
        alone, lo_o, hi_o = _median(make_step(case, c["preset"], augment_only=True))
        print(f"{case} batch {c['batch']} ({c['context']} -> {c['patch']} px): step with {c['preset']} "
              f"{aug * 1e3:.0f} ms [{lo_a * 1e3:.0f}-{hi_a * 1e3:.0f}], plain {plain * 1e3:.0f} ms "
              f"[{lo_p * 1e3:.0f}-{hi_p * 1e3:.0f}]: {c['batch'] / aug:.0f} vs {c['batch'] / plain:.0f} patches/s; "
              f"the augmentation alone {alone * 1e3:.0f} ms [{lo_o * 1e3:.0f}-{hi_o * 1e3:.0f}] = {alone / aug:.1%} "
              f"of the augmented step (target <= 15%)")
    run, cells, per_patch = make_mining()
    t, lo, hi = _median(run, 3)
    print(f"mining the demo training slide ({cells} cells at 1 um/px): {t:.2f} s [{lo:.2f}-{hi:.2f}] dense, "
          f"a patch loop {cells * per_patch:.2f} s ({cells * per_patch / t:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
