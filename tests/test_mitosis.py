"""The mitosis job: streaming component detection against the one-piece definition, NMS,
and the whole job on a real pyramidal TIFF with a model whose map is known in closed form
(Tellez et al. 2018). The candidate detector: tests/test_candidates.py."""
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from pyfastscan import InvalidArgumentError, detect_mitoses
from pyfastscan.mitosis import BandDetector, detect_on_map, suppress
from pyfastscan.samples import carcinoma_image


# ----------------------------------------------------------------------------- map detection


def _blobby_map(rng, shape=(97, 83)):
    m = rng.random(shape).astype(np.float32) * 0.7
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for _ in range(25):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        ry, rx = rng.integers(1, 15), rng.integers(1, 4)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.uniform(0.81, 1.0)
    m[10:80, 40] = 0.9  # a long vertical component across many bands
    m[30:33, 60:63] = 0.95  # a flat maximum: the first in raster order wins
    return m


@pytest.mark.parametrize("band", [1, 2, 7, 16, 200])
def test_streaming_detection_equals_the_map_in_one_piece(band):
    rng = np.random.default_rng(band)
    m = _blobby_map(rng)
    det = BandDetector(m.shape[1], 0.8)
    for r0 in range(0, m.shape[0], band):
        det.feed(r0, m[r0:r0 + band])
    assert sorted(det.finish()) == sorted(detect_on_map(m, 0.8))
    # bands with nothing fed (no tissue) are zero rows: the same as feeding zeros
    z = m.copy()
    z[42:49] = 0
    det = BandDetector(m.shape[1], 0.8)
    for r0 in range(0, m.shape[0], 7):
        if r0 != 42:
            det.feed(r0, z[r0:r0 + 7])
    assert sorted(det.finish()) == sorted(detect_on_map(z, 0.8))


def test_suppress_keeps_the_more_probable_of_close_pairs():
    pts = np.array([[0, 0], [0, 99.9], [0, 100], [300, 300], [300, 310]], dtype=np.float64)
    probs = np.array([0.9, 0.95, 0.99, 0.8, 0.8])
    # 0.99 at (0, 100) first: drops (0, 99.9) (0.1 px) but not (0, 0) (exactly 100: not closer);
    # the tie at 0.8 keeps the smaller y
    assert suppress(pts, probs, 100.0).tolist() == [2, 0, 3]


# ----------------------------------------------------------------------------- the whole job

MPP = 1.0  # um/px of the synthetic slide: 3 x 3 mm
T0, K = 0.06, 120.0  # the model: logit of "mitosis" = K * (T0 - mean RGB in [0, 1]), max over 4 x 4
# (the real patch's darkest pixel has a mean of 0.064: p = 0.38 there, below the 0.8 threshold)


def _darkness_model():
    """Padding-free, stride 4, known in closed form: cell (i, j) has probability
    sigmoid(K * (T0 - min over its 4 x 4 pixels of the mean RGB))."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1, :, 0, 0] = -K / 3
        conv.bias.copy_(torch.tensor([0.0, K * T0]))
    return nn.Sequential(conv, nn.MaxPool2d(4)).double().eval()


# (x, y, darkest mean intensity): 0, 0.004, 0.01, 0.02 give p >= 0.99 (mitoses); 0.035 gives
# p 0.951 (a candidate below delta); the pair 15 px apart is within 25 um: NMS keeps the darker
BLOBS = [(500, 500, 0.0), (560, 500, 0.01), (1500, 700, 0.0), (1512, 709, 0.004), (2400, 2500, 0.035),
         (800, 2200, 0.0), (820, 2260, 0.01), (2900, 150, 0.02)]


def _slide(tmp_path):
    from pyfastscan.io.images import write_pyramid_tif

    patch = carcinoma_image()[..., :3]
    img = np.tile(patch, (3, 3, 1))[:3000, :3000].copy()
    yy, xx = np.mgrid[-12:13, -12:13]
    rr = np.sqrt(yy * yy + xx * xx)
    for x, y, dark in BLOBS:  # radial: darkest at the centre pixel only, 0.3 at radius 12
        val = np.clip(np.rint((dark + (0.3 - dark) * rr / 12) * 255), 0, 255)
        region = img[y - 12:y + 13, x - 12:x + 13]
        region[rr <= 12] = val[rr <= 12, None].astype(np.uint8)
    path = str(tmp_path / "slide.tif")
    write_pyramid_tif(path, img, MPP, levels=3, compression="zlib")  # lossless: the map is known exactly
    return path, img


def _expected(img):
    """The model's map computed directly from the pixels (float64)."""
    mean = img.astype(np.float64).mean(axis=2) / 255
    h, w = (img.shape[0] // 4) * 4, (img.shape[1] // 4) * 4
    low = mean[:h, :w].reshape(h // 4, 4, w // 4, 4).min(axis=(1, 3))
    return 1 / (1 + np.exp(-K * (T0 - low)))


def test_detect_mitoses_end_to_end(tmp_path):
    path, img = _slide(tmp_path)
    expected = _expected(img)
    blob_cells = {(y // 4, x // 4) for x, y, _ in BLOBS}
    far = np.ones(expected.shape, dtype=bool)
    for i, j in blob_cells:
        far[max(0, i - 4):i + 5, max(0, j - 4):j + 5] = False
    assert expected[far].max() < 0.8  # precondition: the tissue itself never crosses the threshold
    everywhere = np.ones((30, 30), dtype=bool)
    res = detect_mitoses(path, _darkness_model(), tissue_mask=everywhere, roi_outputs=64, progress=False)
    one = detect_mitoses(path, _darkness_model(), tissue_mask=everywhere, roi_outputs=2000, progress=False)
    assert res.n_rois > 1 and one.n_rois == 1
    key = [(d.probability, d.x, d.y) for d in res.candidates]
    assert key == [(d.probability, d.x, d.y) for d in one.candidates]  # stitched bands == one piece

    # independently: each blob's component peaks at the cell holding its darkest pixel,
    # map cell (i, j) is centred at (4 j + 2, 4 i + 2); NMS at 25 px drops the weaker of
    # the pair 15 px apart; delta 0.970 drops the 0.035 blob (p 0.951)
    def p(dark):
        return 1 / (1 + math.exp(-K * (T0 - np.rint(dark * 255) / 255)))

    cands = [(p(dk), 4 * (x // 4) + 2.0, 4 * (y // 4) + 2.0) for x, y, dk in BLOBS if (x, y) != (1512, 709)]
    cands.sort(key=lambda c: (-c[0], c[2], c[1]))
    assert [(b, c) for _, b, c in key] == [(b, c) for _, b, c in cands]
    # the map is stored in float32: one rounding (2^-24 relative) of the float64 probability
    assert all(abs(a - e) <= 2.0 ** -24 * e + 1e-12 for (a, _, _), (e, _, _) in zip(key, cands))
    mitoses = [c for c in cands if c[0] >= 0.970]
    assert [(d.x, d.y) for d in res.mitoses] == [(b, c) for _, b, c in mitoses] and len(mitoses) == 6

    # hotspot: brute force over the 8 um grid (every centre is tissue here)
    step = 8.0 / MPP
    n_rows, n_cols = math.ceil(3000 / step), math.ceil(3000 / step)
    cy, cx = (np.arange(n_rows) + 0.5) * step, (np.arange(n_cols) + 0.5) * step
    r2 = 2e6 / math.pi / MPP ** 2
    counts = np.zeros((n_rows, n_cols), dtype=np.int64)
    for _, x, y in mitoses:
        counts += ((cy[:, None] - y) ** 2 + (cx[None, :] - x) ** 2 <= r2)
    assert res.circle.max_count == counts.max()
    i, j = np.unravel_index(np.argmax(counts), counts.shape)
    assert res.circle.max_center_xy == (cx[j], cy[i])
    p95 = float(np.percentile(counts, 95))
    assert res.circle.percentile_count == pytest.approx(p95)
    assert res.grade == (1 if p95 <= 6 else 2 if p95 <= 20 else 3)
    half_w, half_h = math.sqrt(2.37e6 * 4 / 3) / 2, math.sqrt(2.37e6 * 3 / 4) / 2
    rect = np.zeros((n_rows, n_cols), dtype=np.int64)
    for _, x, y in mitoses:
        rect += (np.abs(cy[:, None] - y) <= half_h) & (np.abs(cx[None, :] - x) <= half_w)
    assert res.rect.max_count == rect.max()

    paths = res.save(str(tmp_path / "out"), command="test")
    assert sorted(os.listdir(tmp_path / "out")) == ["hotspot.png", "mitoses.csv", "mitoses.geojson", "report.json"]
    rows = open(paths["mitoses_csv"]).read().splitlines()
    assert rows[0] == "x,y,probability" and len(rows) == 7
    report = json.load(open(paths["report"]))
    assert report["n_mitoses"] == 6 and report["grade"] == res.grade
    assert report["hotspot_circle"]["max_center_mm"] == [v * MPP / 1000 for v in res.circle.max_center_xy]
    assert report["thresholds"]["delta"] == 0.970


def test_region_mask_restricts_counting(tmp_path):
    path, _ = _slide(tmp_path)
    region = np.zeros((30, 30), dtype=bool)
    region[:15, :15] = True  # the top-left quarter of the slide (1.5 x 1.5 mm)
    res = detect_mitoses(path, _darkness_model(), tissue_mask=np.ones((30, 30), dtype=bool), region_mask=region,
                         roi_outputs=200, progress=False)
    cx, cy = res.circle.max_center_xy
    assert cx < 1500 and cy < 1500 and res.count_mask.area_mm2(MPP) == pytest.approx(2.25)
    # the same region as a polygon (level-0 px) gives the same hotspot
    from pyfastscan.io import Annotation

    square = Annotation("polygon", [[0, 0], [1500, 0], [1500, 1500], [0, 1500]], "tumour")
    again = detect_mitoses(path, _darkness_model(), tissue_mask=np.ones((30, 30), dtype=bool),
                           region_mask=[square], roi_outputs=200, progress=False)
    assert again.circle[:3] == res.circle[:3] and again.count_mask.area_mm2(MPP) == pytest.approx(2.25)


def test_mitosis_cli_and_bad_input(tmp_path, capsys):
    from safetensors.torch import save_file

    from pyfastscan.cli import main
    from pyfastscan.models import tellez_cnn
    from pyfastscan.samples import skin_slide_path

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tellez_cnn().state_dict().items()}, str(weights))
    import shutil

    svs = shutil.copy(skin_slide_path(), tmp_path / "cmu_small_region.svs")  # beside the other: OUT/<name>
    status = main(["mitosis", str(svs), str(tmp_path / "missing.svs"), "--weights", str(weights),
                   "--mpp", "4.0", "--out", str(tmp_path / "out"), "--quiet"])
    assert status == 1
    assert os.path.exists(tmp_path / "out" / "cmu_small_region" / "report.json")
    assert "missing.svs" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="delta"):
        detect_mitoses(skin_slide_path(), _darkness_model(), delta=1.5)
