"""Whole-slide scanning: stitched ROI maps equal one ROI covering the slide, outputs open
in OpenSlide, errors name the file (DESIGN.md 2.4)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from helpers import ArraySlide, network_error_bound, patch_loop
from pyfastscan import InvalidArgumentError, SlideError, open_slide, scan_slide, to_dense
from pyfastscan.dense import _flatten
from pyfastscan.pipeline import postprocess
from pyfastscan.samples import skin_slide_path

SVS = skin_slide_path()
OUTPUTS = ["camelyon16_submission.csv", "detections.csv", "detections.geojson", "detections.xml", "heatmap.tif",
           "heatmap_contours.geojson", "heatmap_contours.xml", "overlay.png", "report.json"]


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 2, 3))  # patch 22, stride 4
    return m.to(dtype).eval()


def _image(h=170, w=143, seed=0):
    g = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, dtype=np.uint8)
    img[20:150, 15:130] = g.integers(60, 200, (130, 115, 3), dtype=np.uint8)  # "tissue"
    return img


def test_stitched_map_equals_one_roi_and_the_patch_loop():
    model, img = _model(), _image()
    everywhere = np.ones((17, 14), dtype=bool)  # downsample 143 / 14: covers all 170 rows
    kw = dict(alpha=2, tissue_mask=everywhere, progress=False)
    tiled = scan_slide(ArraySlide(img), model, roi_outputs=5, **kw)
    whole = scan_slide(ArraySlide(img), model, roi_outputs=10_000, **kw)
    assert tiled.n_rois > 1 and whole.n_rois == 1
    # the literal patch loop over the slide, softmax to class 1
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    g = to_dense(model, 2).geometry
    loop = torch.softmax(patch_loop(model, x, g.patch, g.step), dim=1)[0, 1].numpy()
    assert tiled.heatmap.shape == whole.heatmap.shape == loop.shape
    # both are float64 evaluations of the same sums: within the propagated rounding bound
    # (softmax is 1/4-Lipschitz in the logit difference, so the logits' bound applies),
    # plus one float32 rounding of each stored probability (the map is float32)
    crops = torch.cat([x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch]
                       for i in range(loop.shape[0]) for j in range(loop.shape[1])])
    bound = network_error_bound(_flatten(model), crops, torch.float64).amax(dim=1).reshape(loop.shape).numpy()
    store = 2.0 ** -24 * np.abs(loop)
    assert np.all(np.abs(tiled.heatmap.astype(np.float64) - whole.heatmap) <= 2 * bound + 2 * store)
    assert np.all(np.abs(tiled.heatmap.astype(np.float64) - loop) <= 2 * bound + store)


def _loop_and_bound(model, image: np.ndarray, g, n_rows: int, n_cols: int):
    """The literal patch loop's positive-class map of ``image`` in float64, the propagated
    rounding bound of each cell (network_error_bound over its patch), and the float32
    storage rounding of each cell."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255
    loop = torch.softmax(patch_loop(model, x, g.patch, g.step), dim=1)[0, 1].numpy()
    crops = torch.cat([x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch]
                       for i in range(n_rows) for j in range(n_cols)])
    bound = network_error_bound(_flatten(model), crops, torch.float64).amax(dim=1).reshape(loop.shape).numpy()
    return loop, bound, 2.0 ** -24 * np.abs(loop)


def test_map_does_not_depend_on_the_roi_size():
    """Cells whose patch touches no tissue are 0 whatever L_m' is (DESIGN.md 6.2); the
    others are the same float64 sums, within the propagated rounding bound of each run."""
    model, img = _model(), np.tile(_image(), (2, 2, 1))
    mask = np.zeros((34, 29), dtype=bool)  # downsample 10: a partial tissue region
    mask[5:14, 4:12] = True
    mask[20:30, 15:27] = True
    kw = dict(alpha=2, tissue_mask=mask, progress=False)
    maps = [scan_slide(ArraySlide(img), model, roi_outputs=L, **kw) for L in (8, 20, "auto")]
    g = to_dense(model, 2).geometry
    ds = maps[0].tissue.downsample
    n_rows, n_cols = maps[0].heatmap.shape
    touch = np.array([[mask[max(0, int(i * g.step // ds)):int(np.ceil((i * g.step + g.patch) / ds)),
                            max(0, int(j * g.step // ds)):int(np.ceil((j * g.step + g.patch) / ds))].any()
                       for j in range(n_cols)] for i in range(n_rows)])
    loop, bound, store = _loop_and_bound(model, img, g, n_rows, n_cols)
    for res in maps:
        assert np.all(res.heatmap[~touch] == 0)
        assert np.all(np.abs(res.heatmap[touch].astype(np.float64) - loop[touch]) <= (2 * bound + store)[touch])
    assert len({r.n_rois for r in maps}) > 1  # the ROI sizes really differed


def test_background_rois_are_skipped_and_zero():
    img = np.full((300, 280, 3), 240, dtype=np.uint8)
    img[100:200, 90:190] = _image()[20:120, 15:115]
    res = scan_slide(ArraySlide(img), _model(), alpha=1, roi_outputs=4, progress=False)
    assert res.n_rois < res.n_rois_total / 2
    assert res.tissue.mask.any() and not res.tissue.mask.all()
    assert res.heatmap[0, 0] == 0.0 and res.heatmap[28:40, 25:40].min() > 0


def _on_slide_grid(res) -> np.ndarray:
    """What heatmap.tif holds (tests/test_outputs_viewers.py checks the geometry through the
    files): pixels of D = stride_px level-0 px (a whole number in these tests), the slide's
    size in whole pixels, the map shifted by the whole cells of its half-patch origin (pixel
    j holds the cell nearest its centre, j - k), 0 where no cell is."""
    d = res.stride_px
    assert d == round(d)
    w, h = (int(v // d) for v in res.slide_size)
    k = -int(np.floor((0.5 * d - res.origin_px[0]) / d + 0.5))
    placed = np.zeros((h, w), dtype=res.heatmap.dtype)
    n_r, n_c = min(h - k, res.heatmap.shape[0]), min(w - k, res.heatmap.shape[1])
    placed[k:k + n_r, k:k + n_c] = res.heatmap[:n_r, :n_c]
    return placed


def test_outputs_open_in_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    img = np.tile(_image(), (4, 4, 1))  # a map larger than one 256 px tile in one level
    res = scan_slide(ArraySlide(img), _model(torch.float32), alpha=4, progress=False)
    paths = res.save(str(tmp_path / "out"), command="test")
    assert sorted(os.listdir(tmp_path / "out")) == OUTPUTS
    with openslide.OpenSlide(paths["heatmap"]) as hm:
        placed = _on_slide_grid(res)
        assert hm.dimensions == (placed.shape[1], placed.shape[0])
        assert float(hm.properties["openslide.mpp-x"]) == pytest.approx(res.stride_px * 0.5, rel=1e-4)
        region = np.asarray(hm.read_region((0, 0), 0, hm.dimensions))[..., 0]
        assert np.array_equal(region, np.clip(np.rint(placed * 255), 0, 255).astype(np.uint8))
        assert hm.level_count >= 2
    # the contours, read back and drawn on the map's grid, are the thresholded map
    from pyfastscan.io import rasterize, read_asap_xml
    from test_io import ndimage_islands

    outline = read_asap_xml(paths["contours_xml"])
    shift = np.array(res.origin_px) - res.stride_px / 2  # rasterize centres pixel (i, j) at (j + 0.5, i + 0.5) * d
    for a in outline:
        a.coords = a.coords - shift
    above = res.heatmap > 0.5
    assert above.any() and not above.all()
    assert np.array_equal(rasterize(outline, res.heatmap.shape, res.stride_px), above & ~ndimage_islands(above))
    dots = read_asap_xml(paths["detections_xml"])
    assert [tuple(d.coords[0]) for d in dots] == [(d.x, d.y) for d in res.detections]
    rows = list(csv.reader(open(paths["detections_csv"])))
    assert rows[0] == ["x", "y", "probability"]
    assert len(rows) == len(res.detections) + 1 and all(len(r) == 3 for r in rows)
    sub = list(csv.reader(open(paths["camelyon16_csv"])))  # the official layout: no header, integers
    assert [(float(p), int(x), int(y)) for p, x, y in sub] == [
        (pytest.approx(d.probability, abs=1e-6), round(d.x), round(d.y)) for d in res.detections]
    geo = json.load(open(paths["detections_geojson"]))
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(res.detections)
    report = json.load(open(paths["report"]))
    assert report["score"] == pytest.approx(float(res.heatmap.max()))
    assert report["model_geometry"]["alpha"] == 4 and report["command"] == "test"
    assert set(report["timings_s"]) >= {"read_wait", "infer", "postprocess", "tissue", "total"}
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".part")]


def test_float_heatmap(tmp_path):
    """heatmap_dtype="float32": the probabilities themselves at level 0 (on the slide's
    grid), 2 x 2 means above."""
    import tifffile

    res = scan_slide(ArraySlide(np.tile(_image(), (4, 4, 1))), _model(torch.float32), alpha=4, progress=False)
    path = res.save(str(tmp_path / "out"), command="test", heatmap_dtype="float32")["heatmap"]
    with tifffile.TiffFile(path) as t:
        level0, level1 = t.pages[0].asarray(), t.pages[1].asarray()
        assert t.pages[0].is_tiled and len(t.pages) >= 2
    placed = _on_slide_grid(res)
    assert level0.dtype == np.float32 and np.array_equal(level0, placed)
    h, w = (s // 2 * 2 for s in placed.shape)
    halves = placed[:h, :w].reshape(h // 2, 2, w // 2, 2)
    expected = (((halves[:, 0, :, 0] + halves[:, 1, :, 0]) + (halves[:, 0, :, 1] + halves[:, 1, :, 1])) / 4)
    assert np.array_equal(level1, expected.astype(np.float32))
    with pytest.raises(InvalidArgumentError, match="uint8"):
        res.save(str(tmp_path / "out2"), heatmap_dtype="float16")


def test_real_svs_at_a_coarser_resolution():
    pytest.importorskip("openslide")
    res = scan_slide(SVS, _model(torch.float32), alpha=2, mpp=4.0, progress=False)  # level 0 is 0.499 um/px
    w, h = 2220, 2967
    g = to_dense(_model(torch.float32), 2).geometry
    assert res.heatmap.shape == (g.output_side(int(h * 0.499 / 4.0)), g.output_side(int(w * 0.499 / 4.0)))
    assert res.slide_mpp == pytest.approx(0.499, abs=1e-3) and res.tissue.area_mm2(res.slide_mpp) > 0.1


def test_postprocess_finds_components_at_their_maxima():
    heat = np.zeros((20, 30), dtype=np.float32)
    heat[2:6, 3:8] = 0.8
    heat[4, 5] = 0.95
    heat[12:17, 20:26] = 0.6
    heat[14, 23] = 0.7
    heat[10, 2] = 0.99  # a single cell: removed by the opening
    dets = postprocess(heat, stride_px=16.0, origin_px=(50.0, 50.0))
    assert [(round(d.probability, 2), d.x, d.y) for d in dets] == [(0.95, 50 + 5 * 16, 50 + 4 * 16),
                                                                    (0.7, 50 + 23 * 16, 50 + 14 * 16)]


def test_slide_errors_name_the_file(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    with pytest.raises(SlideError, match="notes.svs"):
        open_slide(bad)
    with pytest.raises(SlideError, match="--slide-mpp"):
        scan_slide(ArraySlide(_image(), mpp=None), _model(), progress=False)
    res = scan_slide(ArraySlide(_image(), mpp=None), _model(), mpp=0.5, progress=False)  # mpp stands in
    assert res.slide_mpp == 0.5


def test_progress_on_a_pipe_is_whole_lines(capsys):
    res = scan_slide(ArraySlide(_image()), _model(), alpha=2, roi_outputs=5, tissue_mask=np.ones((17, 14), dtype=bool))
    err = capsys.readouterr().err
    assert "\r" not in err  # not a terminal: whole lines, the last one at the end
    n = res.n_rois
    assert n > 100 and err.splitlines()[-1].startswith(f"scan array-slide: {n}/{n} ROIs") and err.endswith("ETA 0 s\n")


def test_unwritable_output_folder(tmp_path):
    res = scan_slide(ArraySlide(_image()), _model(torch.float32), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidArgumentError, match="output folder"):
        res.save(str(blocker / "out"))


def test_cli_scans_several_slides_and_reports_failures(tmp_path):
    """One good slide (the bundled SVS, coarse) and one missing: the good one is written,
    the bad one reported, exit status 1."""
    pytest.importorskip("openslide")
    from safetensors.torch import save_file

    from pyfastscan.cli import main
    from pyfastscan.models import tellez_cnn

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tellez_cnn().state_dict().items()}, str(weights))
    import shutil

    svs = shutil.copy(SVS, tmp_path / "cmu_small_region.svs")  # beside the other: OUT/<name> (issue 14)
    status = main(["scan", str(svs), str(tmp_path / "missing.svs"), "--weights", str(weights), "--arch", "tellez_cnn",
                   "--mpp", "8.0", "--out", str(tmp_path / "out"), "--quiet", "--resume"])
    assert status == 1
    assert os.path.exists(tmp_path / "out" / "cmu_small_region" / "report.json")
    assert json.load(open(tmp_path / "out" / "cmu_small_region" / "report.json"))["rois_resumed"] == 0
    assert not os.path.exists(tmp_path / "out" / "cmu_small_region" / ".pyfastscan-scan.ckpt")  # done: removed
    assert not os.path.exists(tmp_path / "out" / "missing")


_KILLED_SCAN = """
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from test_scan import ArraySlide, _model
from pyfastscan import scan_slide

from pyfastscan.pipeline.checkpoint import RoiLog

append = RoiLog.append
def slow_append(self, *args):  # each ROI slow enough to be killed midway, however the ROIs are read
    time.sleep(0.2)
    return append(self, *args)
RoiLog.append = slow_append

scan_slide(ArraySlide(np.load(sys.argv[1])), _model(), alpha=2, roi_outputs=5,
           tissue_mask=np.ones((17, 14), dtype=bool), checkpoint=sys.argv[2], progress=False)
"""


def _records(path):
    """Whole records in a checkpoint so far (5 x 5 blocks: 20-byte head + 100 floats)."""
    if not os.path.exists(path):
        return 0
    data = open(path, "rb").read()
    return (len(data) - data.find(b"\n") - 1) // 120 if b"\n" in data else 0


def test_a_killed_scan_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a scan in another process midway; the resumed scan computes only the ROIs
    the log does not hold, and its map equals an uninterrupted scan's, bit for bit."""
    import subprocess
    import sys
    import time

    img = _image()
    np.save(tmp_path / "img.npy", img)
    ckpt = str(tmp_path / "scan.ckpt")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SCAN, str(tmp_path / "img.npy"), ckpt,
                             os.path.dirname(__file__)])
    deadline = time.monotonic() + 120
    while _records(ckpt) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert proc.returncode != 0, "the scan finished before it could be killed"
    with open(ckpt, "ab") as f:
        f.write(b"\x05\x00\x00")  # a record cut short by the kill
    kw = dict(alpha=2, roi_outputs=5, tissue_mask=np.ones((17, 14), dtype=bool), progress=False)
    resumed = scan_slide(ArraySlide(img), _model(), checkpoint=ckpt, resume=True, **kw)
    whole = scan_slide(ArraySlide(img), _model(), **kw)
    assert 3 <= resumed.n_rois_resumed < resumed.n_rois == whole.n_rois
    assert np.array_equal(resumed.heatmap, whole.heatmap)
    assert [(d.probability, d.x, d.y) for d in resumed.detections] == [(d.probability, d.x, d.y)
                                                                       for d in whole.detections]
    # the log now holds every ROI: resuming again computes nothing
    again = scan_slide(ArraySlide(img), _model(), checkpoint=ckpt, resume=True, **kw)
    assert again.n_rois_resumed == again.n_rois and np.array_equal(again.heatmap, whole.heatmap)


def test_a_checkpoint_of_another_scan_is_refused(tmp_path):
    ckpt = str(tmp_path / "scan.ckpt")
    kw = dict(tissue_mask=np.ones((17, 14), dtype=bool), progress=False, checkpoint=ckpt)
    scan_slide(ArraySlide(_image()), _model(), alpha=2, roi_outputs=5, **kw)
    with pytest.raises(InvalidArgumentError, match="different scan.*alpha"):
        scan_slide(ArraySlide(_image()), _model(), alpha=1, roi_outputs=5, resume=True, **kw)
    other = _model()
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(InvalidArgumentError, match="different scan.*weights"):
        scan_slide(ArraySlide(_image()), other, alpha=2, roi_outputs=5, resume=True, **kw)
    half = np.zeros((17, 14), dtype=bool)
    half[:9] = True  # another tissue mask: other ROIs and no-data cells
    with pytest.raises(InvalidArgumentError, match="different scan.*tissue"):
        scan_slide(ArraySlide(_image()), _model(), alpha=2, roi_outputs=5, resume=True, **{**kw, "tissue_mask": half})
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(InvalidArgumentError, match="not a pyfastscan checkpoint"):
        scan_slide(ArraySlide(_image()), _model(), resume=True, **{**kw, "checkpoint": str(tmp_path / "junk")})


def test_auto_roi_size_is_the_largest_that_fits_the_budget():
    from pyfastscan.pipeline.readers import max_read_ahead
    from pyfastscan.pipeline.engine import choose_roi_outputs

    dense = to_dense(_model(torch.float32), 2)
    g = dense.geometry
    buffers = max_read_ahead(2) + 1  # 2 readers: the ROIs read ahead and the one in the model

    def need(L):
        return 2 * dense.activation_bytes(g.input_side(L)) + buffers * 3 * 4 * g.input_side(L) ** 2  # float32 ROIs

    budget = need(37) + 1
    assert choose_roi_outputs(dense, budget, readers=2) == 37
    assert choose_roi_outputs(dense, need(37) - 1, readers=2) == 36
    assert choose_roi_outputs(dense, 1 << 40, readers=2) == 256
    with pytest.raises(InvalidArgumentError, match="memory budget"):
        choose_roi_outputs(dense, 1000)
    res = scan_slide(ArraySlide(_image()), _model(torch.float32), alpha=2, memory=need(9), progress=False, readers=2,
                     precision="fp32")  # need() counts fp32 activations; auto may pick bf16 (AMX)
    assert res.geometry["roi_outputs"] == 9


def test_demo_builds_a_real_pyramidal_slide_and_scans_it(tmp_path):
    """The demo's planted slide is a pyramidal JPEG TIFF OpenSlide reads with its resolution,
    the scan writes every output, and the planted squares hold the held-out carcinoma."""
    openslide = pytest.importorskip("openslide")
    from pyfastscan import demo

    boxes, mpp = demo.build_test_slide(str(tmp_path / "slide.tif"))
    with openslide.OpenSlide(str(tmp_path / "slide.tif")) as s:
        assert s.level_count == 3 and s.dimensions == (2220, 2967)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-3)
    assert len(boxes) == 4
    w = demo.whole_slide(str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "scan")) == OUTPUTS
    assert 0 <= w["found"] <= 4 and w["false_positives"] >= 0


def _pyramid(tmp_path):
    """A lossless 3-level TIFF whose level 1 has a non-integer downsample (601 / 300):
    OpenSlide resamples such a level when a read falls between its pixels."""
    from pyfastscan.io.images import write_pyramid_tif
    from pyfastscan.samples import carcinoma_image

    img = np.full((451, 601, 3), 240, dtype=np.uint8)
    img[30:260, 40:330] = carcinoma_image()[:230, :290]  # glass right and below: cells with no data
    path = str(tmp_path / "odd.tif")
    write_pyramid_tif(path, img, 0.5, levels=3, compression="zlib")
    return path


def test_level_pixels_are_read_as_stored(tmp_path):
    import tifffile

    path = _pyramid(tmp_path)
    s = open_slide(path)
    try:
        ds = s.handle.level_downsamples[1]
        assert not float(ds).is_integer()
        page = tifffile.imread(path, key=1)
        assert np.array_equal(s.read_level(0, 0, page.shape[1], page.shape[0], 1), page)
        assert np.array_equal(s.read_level(37, 11, 50, 40, 1), page[11:51, 37:87])
        # what OpenSlide gives for the same pixels from a level-0 location: resampled
        via_openslide = s.read(int(round(37 * ds)), int(round(11 * ds)), 50, 40, 1)
        assert not np.array_equal(via_openslide, page[11:51, 37:87])
    finally:
        s.close()


def test_resampled_pixels_do_not_depend_on_the_region():
    from pyfastscan.pipeline.engine import read_scan_region

    img = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    s = open_slide(ArraySlide(img))
    for ds in (1.37, 2.5, 0.9985):
        whole = read_scan_region(s, 0, 0, 120, 90, ds, 0, 1.0)
        for x, y, w, h in ((0, 0, 7, 5), (13, 29, 40, 31), (77, 50, 43, 40), (119, 89, 1, 1)):
            part = read_scan_region(s, x, y, w, h, ds, 0, 1.0)
            assert np.array_equal(part, whole[y:y + h, x:x + w]), (ds, x, y)
    # the filter is PyTorch's antialiased bilinear away from the borders (within rounding)
    ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(120, 160),
                                          mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0)
    got = read_scan_region(s, 0, 0, 160, 120, 2.5, 0, 1.0).astype(np.int16)
    assert np.abs(got[3:-3, 3:-3] - ref.round().numpy()[3:-3, 3:-3]).max() <= 1


@pytest.mark.parametrize("where", ["level 0", "level 1 (downsample 2.0033)", "resampled from level 1"])
def test_maps_at_different_roi_sizes_are_equal_at_every_resolution(tmp_path, where):
    """The map does not depend on L_m': every scan-level pixel is the same whichever ROI
    reads it, so the maps at 8, 20 and auto are the same float64 sums (within the
    propagated rounding bound of each) as the patch loop over the scan-level image, with
    equal detections."""
    from pyfastscan.pipeline.engine import read_scan_region

    path = _pyramid(tmp_path)
    s = open_slide(path)
    ds1 = s.handle.level_downsamples[1]
    scan_mpp = {"level 0": 0.5, "level 1 (downsample 2.0033)": 0.5 * ds1, "resampled from level 1": 1.5}[where]
    model = _model()
    maps = [scan_slide(s, model, alpha=2, scan_mpp=scan_mpp, roi_outputs=L, progress=False) for L in (8, 20, "auto")]
    assert len({m.n_rois for m in maps}) == 3  # the ROI sizes really differed
    job_ds = scan_mpp / 0.5
    level = s.best_level(job_ds)
    level_ds = s.handle.level_downsamples[level]
    if abs(job_ds / level_ds - 1) < 1e-3:
        job_ds = level_ds
    assert (level, job_ds == level_ds) == {"level 0": (0, True), "level 1 (downsample 2.0033)": (1, True),
                                           "resampled from level 1": (1, False)}[where]
    g = to_dense(model, 2).geometry
    n_rows, n_cols = maps[0].heatmap.shape
    h, w = g.input_side(n_rows), g.input_side(n_cols)
    image = read_scan_region(s, 0, 0, w, h, job_ds, level, level_ds)  # the scan-level image in one read
    s.close()
    loop, bound, store = _loop_and_bound(model, image, g, n_rows, n_cols)
    on = maps[0].heatmap != 0
    assert on.any() and (~on).any()
    for m in maps:
        assert np.array_equal(m.heatmap != 0, on)  # the same cells are no-data
        diff = np.abs(m.heatmap.astype(np.float64) - loop)
        assert np.all(diff[on] <= (2 * bound + store)[on]), np.unravel_index(np.argmax(diff * on), diff.shape)
        assert [(d.x, d.y) for d in m.detections] == [(d.x, d.y) for d in maps[0].detections]
        assert m.cells["tissue"] == maps[0].cells["tissue"] and m.cells["computed"] >= m.cells["tissue"]


def test_auto_roi_size_takes_the_least_work():
    """Among the sizes that fit, auto takes the one computing the fewest input pixels."""
    from pyfastscan.pipeline.engine import least_work_roi_outputs, plan_rois
    from pyfastscan.slide.tissue import TissueMask

    g = to_dense(_model(), 2).geometry
    mask = np.zeros((200, 200), dtype=bool)
    mask[10:14, 10:14] = mask[150:153, 40:44] = mask[90:120, 130:190] = True
    tissue = TissueMask(mask, 4.0)
    n_rows = n_cols = g.output_side(800)

    def work(L):
        rois, _ = plan_rois(g, n_rows, n_cols, L, tissue, 1.0)
        return sum(r.width * r.height for r in rois)

    chosen = least_work_roi_outputs(g, n_rows, n_cols, 64, tissue, 1.0)
    tried = {max(1, int(round(64 * 0.25 ** (k / 10)))) for k in range(11)}
    assert chosen in tried and work(chosen) == min(work(L) for L in tried) and chosen < 64


def test_the_weights_digest_is_remembered_only_while_the_weights_are_unchanged():
    from pyfastscan.pipeline.checkpoint import weights_digest

    model = _model(torch.float32)
    first = weights_digest(model)
    assert weights_digest(model) == first
    with torch.no_grad():
        next(model.parameters()).view(-1)[0].add_(1)  # in place: the version moves
    edited = weights_digest(model)
    assert edited != first
    model.load_state_dict(_model(torch.float32).state_dict())  # another model's weights, copied in place
    assert weights_digest(model) == first
    name, p = next(model.named_parameters())
    mod, attr = model, name
    while "." in attr:
        head, attr = attr.split(".", 1)
        mod = getattr(mod, head)
    setattr(mod, attr, torch.nn.Parameter(p.detach() + 1))  # a new tensor object in its place
    import copy

    assert weights_digest(model) == weights_digest(copy.deepcopy(model)) not in (first, edited)
