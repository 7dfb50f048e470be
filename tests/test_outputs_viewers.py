"""Scan outputs as the viewers read them (DESIGN.md 6.4): heatmap.tif opened with tifffile
and OpenSlide lines up with the slide using only its own resolution tags and level
downsamples; detections are QuPath detection objects with a probability measurement; the
contours' GeoJSON gives the thresholded map back; the CSVs follow one convention and the
evaluation reads what the scan writes; overlay.png leaves low-probability glass untouched
and outlines the ground truth."""
import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pyfastscan import scan_slide
from pyfastscan.io import Annotation, rasterize, read_annotations, read_geojson, write_asap_xml
from pyfastscan.pipeline.outputs import TRUTH_COLOUR, viewer_grid
from test_scan import ArraySlide

MPP = 0.5
PATCH = 21  # odd: the patch centre is the centre of pixel 10
W, H = 1100, 296  # a heat map wider than one 256 px tile: two pyramid levels


def _centre_tap_model():
    """A patch classifier (patch 21, stride 8) whose class-1 logit depends on the patch's
    centre pixel only: +30 for black, -30 for white, so p(class 1) ~ 1 exactly where the
    centre pixel is dark. With alpha 2 the map step is 4 px: cell c's centre pixel is 10 + 4c."""
    m = nn.Conv2d(3, 2, PATCH, stride=8)
    with torch.no_grad():
        m.weight.zero_()
        m.weight[1, :, PATCH // 2, PATCH // 2] = -20.0
        m.bias.copy_(torch.tensor([0.0, 30.0]))
    return nn.Sequential(m).double().eval()


def _slide(blocks, value=0):
    """A white slide with dark 4 x 4 blocks whose top-left corners are ``blocks`` (x, y)."""
    img = np.full((H, W, 3), 255, dtype=np.uint8)
    for x, y in blocks:
        img[y:y + 4, x:x + 4] = value
    return img


def _scan(img, **kw):
    everywhere = np.ones((H // 8, W // 8), dtype=bool)
    return scan_slide(ArraySlide(img, mpp=MPP), _centre_tap_model(), alpha=2, tissue_mask=everywhere,
                      progress=False, **kw)


BLOCKS = [(40, 28), (200, 100), (328, 236), (12, 260), (1064, 132)]  # multiples of 4: one cell centre pixel each


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    res = _scan(_slide(BLOCKS))
    folder = tmp_path_factory.mktemp("viewers") / "out"
    return res, res.save(str(folder), command="test")


def test_planted_spots_land_on_their_heatmap_pixels_by_the_tiffs_own_tags(scanned):
    """Each planted block is one heat-map pixel: the TIFF pixel whose level-0 square, from
    the resolution tag alone (D = tag mpp / slide mpp), is the block. Level 1 (OpenSlide's
    level downsample 2) holds it at half the index."""
    import tifffile

    res, paths = scanned
    with tifffile.TiffFile(paths["heatmap"]) as t:
        page = t.pages[0]
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        mpp_tif = 1e4 * den / num
        level0 = page.asarray()
        num1, den1 = t.pages[1].tags["XResolution"].value
        ds1 = 1e4 * den1 / num1 / MPP  # level 1's own tag: 2 D level-0 px per pixel
        level1 = t.pages[1].asarray()
    d = mpp_tif / MPP
    assert d == pytest.approx(4, rel=1e-6)
    d = round(d)
    hot = np.argwhere(level0 > 250)
    assert sorted(tuple(int(v) for v in p) for p in hot) == sorted((y // d, x // d) for x, y in BLOCKS)
    assert level0.shape == (H // d, W // d) and (level0 <= 2).sum() == level0.size - len(BLOCKS)
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(paths["heatmap"]) as hm:
        d_os = float(hm.properties["openslide.mpp-x"]) / MPP
        # OpenSlide's level downsample is the ratio of the level sizes (an odd width loses its
        # last column at level 1); the level's resolution tag gives 2 exactly
        assert round(d_os) == d and hm.level_downsamples[1] == pytest.approx(2, rel=0.01)
        for x, y in BLOCKS:
            # a slide point inside the block, projected through the TIFF's own geometry
            px, py = (x + 1.5) / d_os, (y + 2.5) / d_os
            v0 = np.asarray(hm.read_region((int(px), int(py)), 0, (1, 1)))[0, 0, 0]
            assert v0 > 250, (x, y, v0)
    assert ds1 == pytest.approx(2 * d, rel=1e-6)
    for x, y in BLOCKS:  # level 1: the 2 x 2 mean holding the spot (255 / 4)
        assert level1[int((y + 2.5) / ds1), int((x + 1.5) / ds1)] >= 63, (x, y)
    # ASAP's overlay scale is the integer slide width // overlay width (and must equal the
    # heights'): that is D
    assert W // level0.shape[1] == H // level0.shape[0] == d


def test_report_says_which_slide_area_each_pixel_stands_for(scanned):
    res, paths = scanned
    rep = json.load(open(paths["report"]))["heatmap"]
    assert rep["pixel_px"] == 4 and rep["pixel_um"] == pytest.approx(4 * MPP) and rep["exact"]
    # the cell a pixel holds has its patch centre at pixel 10 + 4c, i.e. level-0 10.5 + 4c;
    # pixel j = c + 2's square centre is 4j + 2: offset 0.5 px, within D / 2
    assert res.origin_px == (10.5, 10.5) and rep["cell_offset_px"] == [0.5, 0.5]
    assert rep["shape"] == [H // 4, W // 4]


@settings(max_examples=200, deadline=None)
@given(stride=st.floats(0.7, 40), origin=st.floats(0, 150), w=st.integers(1, 3000), h=st.integers(1, 3000))
def test_viewer_grid_holds_the_nearest_cell(stride, origin, w, h):
    """Every grid pixel holds the map cell whose patch centre is nearest its centre (brute
    force over the cells), D is a whole number, the grid fits the slide, and the offset it
    reports bounds the distance."""
    d, rows, cols, offset = viewer_grid(stride, (origin, origin), (w, h))
    assert d == round(d) >= 1 and abs(d - stride) <= 0.5 + 1e-9
    assert len(cols) == max(1, w // d) and len(rows) == max(1, h // d)
    centres = (np.arange(len(cols)) + 0.5) * d
    cells = np.arange(-2, int(w / stride) + 3)
    dist = np.abs(origin + cells[None, :] * stride - centres[:, None])
    best = dist.min(axis=1)
    held = np.abs(origin + cols * stride - centres)
    assert np.all(held <= best + 1e-9 * max(1.0, stride * len(cells)))
    assert np.all(held <= stride / 2 + 1e-9 * max(1.0, origin + stride * len(cells)))
    assert np.all(held <= abs(offset[0]) + 1e-6)


def test_non_integer_step_is_placed_within_half_a_pixel(tmp_path):
    """At scan_mpp 0.65 the step is 4 * 1.3 = 5.2 level-0 px: heatmap.tif has D = 5 px
    pixels, and every hot pixel's square lies within D / 2 + one scan pixel of a planted
    block (the read is resampled, so a block can reach the centre tap of a neighbour)."""
    import tifffile

    blocks = [(60, 40), (250, 180)]
    img = np.full((H, W, 3), 255, dtype=np.uint8)
    for x, y in blocks:
        img[y:y + 8, x:x + 8] = 0
    res = _scan(img, scan_mpp=0.65)
    assert res.stride_px == pytest.approx(5.2)
    path = res.save(str(tmp_path / "o"))["heatmap"]
    with tifffile.TiffFile(path) as t:
        num, den = t.pages[0].tags["XResolution"].value
        grid = t.pages[0].asarray()
    d = round(1e4 * den / num / MPP)
    assert d == 5
    hot = np.argwhere(grid > 127)
    assert len(hot)
    slack = d / 2 + 1.3
    for i, j in hot:
        cx, cy = (j + 0.5) * d, (i + 0.5) * d
        assert any(x - slack <= cx <= x + 8 + slack and y - slack <= cy <= y + 8 + slack for x, y in blocks), (i, j)
    for x, y in blocks:  # and each block is seen
        i, j = int((y + 4) // d), int((x + 4) // d)
        assert grid[i - 1:i + 2, j - 1:j + 2].max() > 127


def test_detections_are_qupath_detection_objects(scanned):
    """detections.geojson: one Point Feature per detection, objectType "detection",
    classification Tumor, the probability as QuPath's measurement (the 0.4+ map form); the
    evaluation reads the probabilities back from it."""
    from pyfastscan.eval.files import read_points

    res, paths = scanned
    assert len(res.detections) == 0  # a single hot cell is removed by the 3x3 opening (Fast ScanNet)
    img = _slide([(x + dx, y + dy) for x, y in BLOCKS[:2] for dx in (0, 4, 8) for dy in (0, 4, 8)])
    res2 = _scan(img)
    paths2 = res2.save(paths["report"].rsplit("/", 2)[0] + "/out2")
    assert len(res2.detections) == 2
    feats = json.load(open(paths2["detections_geojson"]))["features"]
    assert [f["geometry"] for f in feats] == [{"type": "Point", "coordinates": [d.x, d.y]} for d in res2.detections]
    for f, d in zip(feats, res2.detections):
        p = f["properties"]
        assert p["objectType"] == "detection" and p["classification"] == {"name": "Tumor"}
        assert p["measurements"] == {"probability": pytest.approx(d.probability, rel=1e-7)}
    xy, prob = read_points(paths2["detections_geojson"])
    assert np.allclose(prob, [d.probability for d in res2.detections])
    assert np.array_equal(xy, [[d.x, d.y] for d in res2.detections])
    # each detection sits on its 3 x 3 block of hot cells: the centre of a planted 12 px square
    for d, (x, y) in zip(sorted(res2.detections, key=lambda d: d.x), sorted(BLOCKS[:2])):
        assert x <= d.x <= x + 12 and y <= d.y <= y + 12


def test_contours_geojson_gives_the_thresholded_map_back(tmp_path):
    """A ring of hot cells with a hot island in its hole: one polygon with a hole, one
    island polygon, QuPath annotations with a "max probability" measurement; rasterised on
    the map's grid they are the thresholded map exactly."""
    cells = {(r, c) for r in range(10, 17) for c in range(20, 27)} - {(r, c) for r in range(11, 16)
                                                                       for c in range(21, 26)}
    cells |= {(13, 23)} | {(r, c) for r in range(40, 44) for c in range(60, 63)}
    img = _slide([(10 + 4 * c - 2, 10 + 4 * r - 2) for r, c in cells])  # cell c's centre pixel 10 + 4c
    res = _scan(img)
    above = res.heatmap > res.threshold
    assert {tuple(int(v) for v in p) for p in np.argwhere(above)} == cells
    paths = res.save(str(tmp_path / "o"))
    path = paths["contours_geojson"]
    doc = json.load(open(path))
    polys = read_geojson(path)
    assert len(polys) == 3 and sorted(len(p.holes) for p in polys) == [0, 0, 1]
    for f in doc["features"]:
        assert f["properties"]["objectType"] == "annotation" and f["properties"]["classification"] == {"name": "Tumor"}
        assert 0.5 < f["properties"]["measurements"]["max probability"] <= 1
    shift = np.array(res.origin_px) - res.stride_px / 2  # rasterize centres pixel (i, j) at (j + 0.5, i + 0.5) * d
    for a in polys:
        a.coords = a.coords - shift
        a.holes = [h - shift for h in a.holes]
    assert np.array_equal(rasterize(polys, res.heatmap.shape, res.stride_px), above)
    # the ASAP XML has the same rings, the hole as a polygon of exclusion group "_2": the
    # island inside it is removed when rasterised (ASAP XML cannot say otherwise)
    xml = read_annotations(paths["contours_xml"])
    assert sorted(a.group for a in xml) == ["Tumor", "Tumor", "Tumor", "_2"]
    for a in xml:
        a.coords = a.coords - shift
    island = np.zeros_like(above)
    island[13, 23] = True
    assert np.array_equal(rasterize(xml, res.heatmap.shape, res.stride_px), above & ~island)


def test_csv_convention_and_the_evaluation_reads_what_is_written(tmp_path):
    """detections.csv is x,y,probability with a header; camelyon16_submission.csv is the
    Camelyon16 script's layout (probability,x,y, no header, integer coordinates, which its
    reader parses with float() and int()); `pyfastscan evaluate` finds and reads either."""
    from pyfastscan.eval.files import prediction_files, read_points_csv, scan_report

    img = _slide([(x + dx, y + dy) for x, y in BLOCKS for dx in (0, 4, 8) for dy in (0, 4, 8)])
    res = _scan(img)
    assert len(res.detections) == len(BLOCKS)
    paths = res.save(str(tmp_path / "preds" / "slide_1"))
    rows = list(csv.reader(open(paths["detections_csv"])))
    assert rows[0] == ["x", "y", "probability"]
    for line in open(paths["camelyon16_csv"]):
        p, x, y = line.rstrip().split(",")  # as the official readCSVContent does
        float(p), int(x), int(y)
    assert prediction_files(str(tmp_path / "preds")) == {"slide_1": paths["detections_csv"]}
    assert scan_report(paths["camelyon16_csv"])["score"] == pytest.approx(res.score)
    xy, prob = read_points_csv(paths["detections_csv"])
    xy2, prob2 = read_points_csv(paths["camelyon16_csv"])
    want = np.array([[d.x, d.y] for d in res.detections])
    assert np.allclose(xy, want, atol=0.05) and np.array_equal(xy2, np.floor(want + 0.5))
    assert np.allclose(prob, prob2) and np.allclose(prob, [d.probability for d in res.detections], atol=5e-7)


def test_overlay_is_clear_glass_below_the_floor_and_outlines_the_truth(tmp_path):
    """Where the map is below the overlay floor the slide's thumbnail shows as it is; the
    planted spots are coloured; the ground truth outline is drawn; a legend strip (colour
    bar, scale bar) lies below the thumbnail."""
    from PIL import Image

    img = _slide([(x + dx, y + dy) for x, y in BLOCKS[:2] for dx in range(0, 24, 4) for dy in range(0, 24, 4)])
    img[150:, :200] = (230, 200, 220)  # pale pink tissue, far from the spots
    res = _scan(img)
    x0, y0 = BLOCKS[0]
    truth = [Annotation("polygon", [[x0, y0], [x0 + 24, y0], [x0 + 24, y0 + 24], [x0, y0 + 24]], "Tumor")]
    write_asap_xml(tmp_path / "truth.xml", truth)
    paths = res.save(str(tmp_path / "o"), truth=read_annotations(tmp_path / "truth.xml"))
    over = np.asarray(Image.open(paths["overlay"]).convert("RGB"))
    thumb, ds = res.thumbnail, res.thumbnail_downsample
    th, tw = thumb.shape[:2]
    assert over.shape[0] > th + 40 and over.shape[1] >= tw  # the legend strip
    part = over[:th, :tw]
    # far from every spot, truth and detection mark (and off the tissue outline): unchanged
    ys, xs = (np.arange(th) + 0.5) * ds, (np.arange(tw) + 0.5) * ds
    far = (np.abs(ys[:, None] - 250) < 20) & (np.abs(xs[None, :] - 100) < 60)
    assert far.any() and np.array_equal(part[far], thumb[far])
    # on a planted spot, coloured (the slide there is black)
    spot = part[int((y0 + 12) / ds), int((x0 + 12) / ds)]
    assert spot.max() > 60, spot
    # the truth's outline in its colour along the square's top edge
    edge = part[int(round(y0 / ds)), int((x0 + 4) / ds):int((x0 + 20) / ds)]
    assert (np.abs(edge.astype(int) - TRUTH_COLOUR).sum(axis=1) < 60).any(), edge


def test_cli_scan_truth_outlines_it_and_a_bad_file_fails_before_the_scan(tmp_path, capsys):
    pytest.importorskip("openslide")
    from PIL import Image

    from pyfastscan import open_slide
    from pyfastscan.cli import main
    from pyfastscan.demo_train import WEIGHTS
    from pyfastscan.samples import skin_slide_path

    truth = [Annotation("polygon", [[400, 600], [1400, 600], [1400, 1600], [400, 1600]], "Tumor")]
    write_asap_xml(tmp_path / "truth.xml", truth)
    out = tmp_path / "out"
    argv = ["scan", skin_slide_path(), "--weights", WEIGHTS, "--out", str(out), "--quiet", "--scan-mpp", "4",
            "--truth", str(tmp_path / "truth.xml")]
    assert main(argv) == 0
    slide = open_slide(skin_slide_path())
    thumb, ds = slide.thumbnail()  # what the scan drew on
    slide.close()
    over = np.asarray(Image.open(out / "overlay.png").convert("RGB")).astype(int)[:thumb.shape[0], :thumb.shape[1]]
    green = np.abs(over - TRUTH_COLOUR).sum(axis=2) < 40
    # the square's four edges, where the truth says, in the thumbnail's pixels
    x0, x1, y0, y1 = (round(v / ds) for v in (400, 1400, 600, 1600))
    for edge in (green[y0 - 1:y0 + 2, x0 + 5:x1 - 5], green[y1 - 1:y1 + 2, x0 + 5:x1 - 5],
                 green[y0 + 5:y1 - 5, x0 - 1:x0 + 2].T, green[y0 + 5:y1 - 5, x1 - 1:x1 + 2].T):
        assert edge.any(axis=0).mean() > 0.9  # drawn along the edge (detection marks may cover a little)
    assert green.sum() < 3 * 4 * (x1 - x0 + y1 - y0)  # and nothing else green
    bad = tmp_path / "truth.txt"
    bad.write_text("x")
    capsys.readouterr()
    argv2 = ["scan", skin_slide_path(), "--weights", WEIGHTS, "--out", str(tmp_path / "out2"), "--quiet",
             "--scan-mpp", "4", "--truth", str(bad)]
    assert main(argv2) == 1
    err = capsys.readouterr().err
    assert "truth.txt" in err and "unknown annotation format" in err and "Traceback" not in err
    assert not (tmp_path / "out2" / "heatmap.tif").exists()
