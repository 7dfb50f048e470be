"""`pyfastscan demo`: the whole job on real pixels, no download.

1. The invariant on the spot: a small padding-free net through to_dense (anchor layers)
   against a patch-by-patch loop (DESIGN.md 2.2).
2. A test slide: held-out carcinoma regions of the bundled TIAToolbox patch planted at
   known positions into the bundled CMU skin slide, written as a real pyramidal TIFF
   (JPEG tiles, resolution tags).
3. scan_slide with the bundled demo model (pyfastscan/data/demo_model.safetensors, made by
   ``python -m pyfastscan.demo_train``), all outputs written, planted regions found and
   false positives counted. A demonstration, not a diagnostic model.
"""
import os
import sys
import time

import torch
from torch import nn

from .backends import build_info, format_build_info
from .dense import to_dense
from .ops import last_backend


def run(map_side: int = 32) -> dict:
    torch.manual_seed(0)
    sparse = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3), nn.ReLU(),
                           nn.MaxPool2d(2), nn.Conv2d(16, 2, 3)).double()
    # Fast ScanNet schedule (DESIGN.md 2.3): the second pooling becomes the reconstruction
    # layer (AnchPool s_a = 2, d_a = alpha) and the last conv an AnchConv (s_a = d_a = alpha).
    dense = to_dense(sparse, alpha=2, plan="paper")
    g = dense.geometry
    patch, stride, alpha = g.patch, g.stride, g.alpha
    side = g.input_side(alpha * map_side)  # DESIGN.md 2.2, Eq. 1
    x = torch.rand(1, 3, side, side, dtype=torch.float64)
    with torch.no_grad():
        t0 = time.perf_counter()
        dense_map = dense(x)
        t_dense = time.perf_counter() - t0
        step = g.step
        n = dense_map.shape[-1]
        patches = torch.stack([x[0, :, i * step:i * step + patch, j * step:j * step + patch]
                               for i in range(n) for j in range(n)])
        t0 = time.perf_counter()
        loop_map = sparse(patches).reshape(n, n, 2).permute(2, 0, 1)[None]
        t_loop = time.perf_counter() - t0
    diff = (dense_map - loop_map).abs().max().item()
    return dict(patch=patch, stride=stride, alpha=alpha, input_side=side, map_shape=tuple(dense_map.shape),
                max_abs_diff=diff, t_dense=t_dense, t_patch_loop=t_loop, conv_backend=last_backend("anch_conv2d"),
                pool_backend=last_backend("anch_pool2d"))


def build_test_slide(path: str, n_regions: int = 4, seed: int = 0):
    """Plant n_regions held-out carcinoma squares into the skin slide at tissue positions;
    write a 3-level pyramidal TIFF. Returns the boxes (x0, y0, x1, y1) in level-0 pixels."""
    import numpy as np

    from .demo_train import TRAIN_FRACTION, carcinoma_at, not_glass, resize
    from .io.images import write_pyramid_tif
    from .samples import skin_slide_path
    from .slide import open_slide

    s = open_slide(skin_slide_path())
    mpp = s.mpp
    w, h = s.dimensions
    skin = s.read(0, 0, w, h)
    s.close()
    carc = carcinoma_at(mpp)
    held = carc[:, int(carc.shape[1] * TRAIN_FRACTION) + 2:]  # never seen in training
    side = min(held.shape[1], held.shape[0] // n_regions)
    mask = not_glass(resize(skin, 1 / 8))  # tissue at 1/8 scale to place the squares
    rng = np.random.default_rng(seed)
    boxes = []
    while len(boxes) < n_regions:
        y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        cy, cx = min((y + side // 2) // 8, mask.shape[0] - 1), min((x + side // 2) // 8, mask.shape[1] - 1)
        far = all(abs(x - b[0]) > 2 * side or abs(y - b[1]) > 2 * side for b in boxes)
        if mask[cy, cx] and far:
            k = len(boxes)
            skin[y:y + side, x:x + side] = held[k * side:(k + 1) * side, :side]
            boxes.append((int(x), int(y), int(x + side), int(y + side)))
    write_pyramid_tif(path, skin, mpp, levels=3, compression="jpeg")
    return boxes, mpp


def whole_slide(out_dir: str) -> dict:
    import numpy as np

    from . import load_model, scan_slide
    from .demo_train import PATCH, SCAN_MPP, WEIGHTS
    from .io import Annotation, read_annotations, write_asap_xml

    os.makedirs(out_dir, exist_ok=True)
    slide_path = os.path.join(out_dir, "demo_slide.tif")
    t = time.perf_counter()
    boxes, mpp = build_test_slide(slide_path)
    t_build = time.perf_counter() - t
    # the planted squares are the ground truth: written as ASAP XML, read back as any
    # `pyfastscan scan --truth FILE` would be, and outlined in overlay.png
    truth_path = write_asap_xml(os.path.join(out_dir, "demo_truth.xml"), [
        Annotation("polygon", [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "Tumor", f"planted {k}")
        for k, (x0, y0, x1, y1) in enumerate(boxes)])
    model = load_model(WEIGHTS)  # the file says: demo_cnn, carcinoma is class 1, trained at 1 um/px
    res = scan_slide(slide_path, model, alpha=2)
    paths = res.save(os.path.join(out_dir, "scan"), command="pyfastscan demo", truth=read_annotations(truth_path))
    paths = {"truth": truth_path, **paths}
    margin = PATCH / 2 * SCAN_MPP / mpp  # a detection is a patch centre: allow half a patch
    hit = [any(b[0] - margin <= d.x <= b[2] + margin and b[1] - margin <= d.y <= b[3] + margin
               for d in res.detections) for b in boxes]
    fp = [d for d in res.detections if not any(b[0] - margin <= d.x <= b[2] + margin and
                                               b[1] - margin <= d.y <= b[3] + margin for b in boxes)]
    # cell-level view: share of map cells above threshold inside the planted squares and on
    # the rest of the tissue
    cy = res.origin_px[1] + np.arange(res.heatmap.shape[0]) * res.stride_px
    cx = res.origin_px[0] + np.arange(res.heatmap.shape[1]) * res.stride_px
    planted = np.zeros(res.heatmap.shape, dtype=bool)
    for b in boxes:
        planted |= ((cy >= b[1]) & (cy < b[3]))[:, None] & ((cx >= b[0]) & (cx < b[2]))[None, :]
    tissue = res.tissue.on_grid(cy, cx) & ~planted
    return dict(slide=slide_path, boxes=boxes, result=res, paths=paths, found=sum(hit), false_positives=len(fp),
                t_build=t_build, planted_positive=float((res.heatmap[planted] > 0.5).mean()),
                tissue_positive=float((res.heatmap[tissue] > 0.5).mean()))


def main(out_dir: str = "pyfastscan-demo") -> int:
    from .errors import InvalidArgumentError
    from .io.files import prepare_folder

    try:  # before any work: an unwritable folder is said in one line, not after the scan
        prepare_folder(out_dir)
    except InvalidArgumentError as exc:
        print(f"pyfastscan demo: {exc} (choose another with --out DIR)", file=sys.stderr)
        return 1
    print(format_build_info(build_info()))
    print("\n1. The invariant (random weights): dense map == patch-by-patch map")
    r = run()
    print(f"  patch classifier: patch {r['patch']} px, stride {r['stride']} px; dense factor alpha = {r['alpha']}")
    print(f"  input {r['input_side']} x {r['input_side']} px -> dense map {r['map_shape'][2]} x {r['map_shape'][3]} "
          f"(stride {r['stride'] // r['alpha']} px), anchor layers on backends pool={r['pool_backend']}, "
          f"conv={r['conv_backend']}")
    print(f"  dense scan {r['t_dense'] * 1e3:.1f} ms vs patch-by-patch {r['t_patch_loop'] * 1e3:.1f} ms "
          f"(float64, {r['map_shape'][2] * r['map_shape'][3]} patches)")
    # float64, three layers of at most 16*9 + 1 = 145-term sums of O(1) values: the
    # summation-order difference is bounded by about 3 * 145 * 2^-53 * max|activation|
    # (~1e-13 here); 1e-12 leaves room and still fails on any wrong tap (errors ~1e-2).
    ok = r["max_abs_diff"] <= 1e-12
    print(f"  dense map equals the patch-by-patch map: max |difference| = {r['max_abs_diff']:.2e} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    if not ok:
        return 1
    print("\n2-3. Whole-slide scan of a test slide (DEMONSTRATION model, not for diagnosis):")
    w = whole_slide(out_dir)
    res = w["result"]
    t = res.timings
    print(f"  test slide: {w['slide']} (skin, CMU-1-Small-Region, with {len(w['boxes'])} held-out carcinoma regions "
          f"planted at {w['boxes']}; built in {w['t_build']:.1f} s)")
    print(f"  scan: {res.heatmap.shape[1]} x {res.heatmap.shape[0]} map, step {res.stride_px:.1f} level-0 px, "
          f"{res.n_rois}/{res.n_rois_total} ROIs on tissue ({res.tissue.area_mm2(res.slide_mpp):.2f} mm^2)")
    print(f"  time: open {t['open']:.2f} s, tissue {t['tissue']:.2f} s, waiting for reads {t['read_wait']:.2f} s, "
          f"inference {t['infer']:.2f} s, post-processing {t['postprocess']:.2f} s, total {t['total']:.2f} s")
    print(f"  slide score {res.score:.3f}; {len(res.detections)} detections: planted regions found "
          f"{w['found']}/{len(w['boxes'])}, false positives {w['false_positives']}")
    print(f"  map cells above 0.5: {w['planted_positive']:.1%} inside the planted regions, "
          f"{w['tissue_positive']:.1%} on the skin tissue around them")
    print("  overlay.png outlines the planted regions (the ground truth, green); a filled ring is a detection "
          "inside one")
    print("  outputs:")
    for name, path in w["paths"].items():
        print(f"    {name:20s} {os.path.abspath(path)}")
    return 0


def train_main(out_dir: str = "pyfastscan-demo-train", epochs: int = 4, seed: int = 0, *, cli) -> int:
    """`pyfastscan demo --train`: the demo model trained with `pyfastscan train` on the bundled
    samples as annotated slides (pyfastscan.demo_train.build_training_slides), one hard
    negative mining round, and the false-positive share on the held-out skin tissue before
    and after it. A few minutes on a 2-core CPU; a demonstration, not a diagnostic model.
    ``cli``: the command line's main(argv) that runs `pyfastscan train` (pyfastscan.cli passes
    itself: the jobs do not import the command line)."""
    import json

    from .demo_train import build_training_slides

    t0 = time.perf_counter()
    manifest = build_training_slides(os.path.join(out_dir, "slides"), seed=seed)
    print(f"annotated slides from the bundled samples: {manifest} (skin with planted carcinoma; the held-out half "
          f"is the validation slide)")
    run = os.path.join(out_dir, "run")
    argv = ["train", "--manifest", manifest, "--out", run, "--arch", "demo_cnn", "--mpp", "1", "--epochs", str(epochs),
            "--epoch-patches", "3200", "--val-patches", "512", "--batch-size", "64", "--lr", "2e-3",
            "--augment", "fastscannet", "--mine-rounds", "1", "--mine-epochs", "2", "--hard-share", "0.25",
            "--mine-lr", "5e-4", "--positive-inset-um", "12",
            "--seed", str(seed)]
    print("$ pyfastscan " + " ".join(argv))
    rc = cli(argv)
    if rc:
        return rc
    with open(os.path.join(run, "training.json")) as f:
        report = json.load(f)
    r = report["rounds"][0]
    print(f"\nfalse-positive share on the held-out skin tissue: {r['fp_before']:.2%} before mining, "
          f"{r['fp_after']:.2%} after ({r['found']} hard negatives mined from the training slide); held-out "
          f"carcinoma cells found: {r['sensitivity_before']:.2%} before, {r['sensitivity_after']:.2%} after; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"weights: {report['weights']} (pyfastscan scan SLIDE --weights {report['weights']} --out OUT)")
    return 0
