"""Slide reading: the tifffile fallback for TIFFs OpenSlide refuses, and SubIFD pyramids
(OME-TIFF) that OpenSlide does not see (DESIGN.md 2.4)."""
import os
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from pyfastscan import SlideError, open_slide, scan_slide
from pyfastscan.slide.tiff import TiffFileSlide
from test_scan import ArraySlide, _model

tifffile = pytest.importorskip("tifffile")
openslide = pytest.importorskip("openslide")


def _rgb(h=700, w=530, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _striped(path, img, mpp=0.25, **kw):
    tifffile.imwrite(path, img, rowsperstrip=64, photometric="rgb" if img.ndim == 3 else "minisblack",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **kw)
    return str(path)


def test_a_striped_tiff_openslide_refuses_is_read_with_tifffile(tmp_path):
    img = _rgb()
    path = _striped(tmp_path / "striped.tif", img)
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(path)
    s = open_slide(path)
    assert isinstance(s.handle, TiffFileSlide) and s.mpp == pytest.approx(0.25)
    assert s.dimensions == (530, 700)
    # regions across strip boundaries, and partly outside the image (white, as OpenSlide's transparent)
    assert np.array_equal(s.read(100, 50, 300, 400), img[50:450, 100:400])
    out = s.read(-10, 690, 30, 30)
    assert np.array_equal(out[:10, 10:], img[690:700, 0:20]) and (out[10:] == 255).all() and (out[:, :10] == 255).all()
    s.close()


@pytest.mark.parametrize("layout", ["greyscale", "planar", "jpeg-tiles"])
def test_other_layouts_read_the_same_pixels(tmp_path, layout):
    img = _rgb(300, 260)
    if layout == "greyscale":
        img = img[..., :1].repeat(3, axis=2)
        path = _striped(tmp_path / "g.tif", img[..., 0])
    elif layout == "planar":
        path = _striped(tmp_path / "p.tif", np.moveaxis(img, 2, 0).copy(), planarconfig="separate")
    else:  # JPEG tiles: lossy, so compare with what tifffile itself decodes
        path = str(tmp_path / "j.tif")
        tifffile.imwrite(path, img, tile=(64, 64), compression="jpeg", photometric="rgb")
        img = tifffile.imread(path)
    s = TiffFileSlide(path)
    assert np.array_equal(s.read_region((37, 21), 0, (200, 250))[..., :3], img[21:271, 37:237])
    s.close()


def test_subifd_pyramid_levels_are_seen(tmp_path):
    """An OME-TIFF with its pyramid in SubIFDs: OpenSlide sees level 0 only, tifffile all."""
    img = _rgb(512, 384)
    half = img.reshape(256, 2, 192, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    path = str(tmp_path / "pyr.ome.tif")
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(img, tile=(128, 128), subifds=1, photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tif.write(half, tile=(128, 128), photometric="rgb", subfiletype=1)
    s = TiffFileSlide(path)
    assert s.level_dimensions == [(384, 512), (192, 256)] and s.level_downsamples == [1.0, 2.0]
    assert np.array_equal(s.read_region((64, 32), 1, (100, 120))[..., :3], half[16:136, 32:132])
    assert open_slide(s).mpp == pytest.approx(0.5)
    s.close()


def test_a_scan_of_the_fallback_equals_the_same_pixels_in_memory(tmp_path):
    img = _rgb(170, 143)
    path = _striped(tmp_path / "s.tif", img, mpp=0.5)
    kw = dict(alpha=2, roi_outputs=7, tissue_mask=np.ones((4, 4), dtype=bool), progress=False)
    a = scan_slide(path, _model(torch.float32), **kw)
    b = scan_slide(ArraySlide(img), _model(torch.float32), **kw)
    assert np.array_equal(a.heatmap, b.heatmap)


def test_truncated_and_fake_tiffs_name_the_file_and_both_reasons(tmp_path):
    path = _striped(tmp_path / "cut.tif", _rgb())
    data = open(path, "rb").read()
    (tmp_path / "cut.tif").write_bytes(data[:2000])
    with pytest.raises(SlideError, match=r"cut\.tif.*OpenSlide.*tifffile"):
        s = open_slide(str(tmp_path / "cut.tif"))
        s.read(0, 0, 530, 700)  # pragma: no cover - the open must fail first
    (tmp_path / "fake.tif").write_bytes(b"II*\x00" + b"\xff" * 50)
    with pytest.raises(SlideError, match=r"fake\.tif.*tifffile"):
        open_slide(str(tmp_path / "fake.tif"))


def test_a_corrupt_strip_is_a_slide_error_naming_the_file(tmp_path):
    path = _striped(tmp_path / "bad.tif", _rgb(), compression="zlib")
    with tifffile.TiffFile(path) as t:
        offset = t.pages[0].dataoffsets[1]
    data = bytearray(open(path, "rb").read())
    data[offset:offset + 64] = b"\x00" * 64  # strip 1 no longer inflates
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    s = open_slide(path)
    assert s.read(0, 0, 50, 50).shape == (50, 50, 3)  # strip 0 is intact
    with pytest.raises(SlideError, match=r"bad\.tif: segment 1 of level 0"):
        s.read(0, 60, 50, 50)
    s.close()



def _otsu_mask_reference(rgb, min_saturation=20):
    """otsu_tissue_mask as scipy.ndimage's morphology computes it."""
    from scipy import ndimage

    from pyfastscan.slide.tissue import _otsu

    sat = (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).astype(np.uint8)
    mask = sat > max(_otsu(sat), min_saturation)
    box = np.ones((3, 3), dtype=bool)
    return ndimage.binary_fill_holes(ndimage.binary_opening(ndimage.binary_closing(mask, box), box))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 48), st.integers(1, 48), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_otsu_tissue_mask_is_scipys_morphology_pixel_for_pixel(h, w, density, seed):
    """The whole-array closing, opening and hole filling equal scipy.ndimage's (whose
    border counts as background), on random images from empty to full, any shape."""
    from pyfastscan.slide.tissue import otsu_tissue_mask

    rng = np.random.default_rng(seed)
    rgb = np.full((h, w, 3), 240, np.uint8)
    tissue = rng.random((h, w)) < density
    rgb[tissue] = rng.integers(0, 256, (int(tissue.sum()), 3), dtype=np.uint8)
    got = otsu_tissue_mask(rgb, 4.0)
    assert got.mask.dtype == bool and got.downsample == 4.0
    assert np.array_equal(got.mask, _otsu_mask_reference(rgb))


def test_otsu_tissue_mask_takes_uint8_rgb_and_ignores_alpha():
    from pyfastscan import InvalidArgumentError
    from pyfastscan.slide.tissue import otsu_tissue_mask

    rgb = _rgb(40, 30)
    rgba = np.concatenate([rgb, np.full((40, 30, 1), 7, np.uint8)], axis=2)  # alpha would be the minimum
    assert np.array_equal(otsu_tissue_mask(rgba, 1.0).mask, otsu_tissue_mask(rgb, 1.0).mask)
    for bad in (rgb / 255.0, rgb[..., 0], rgb[..., :2], rgb.astype(bool)):
        with pytest.raises(InvalidArgumentError, match="uint8 RGB"):
            otsu_tissue_mask(bad, 1.0)


def test_otsu_tissue_mask_of_a_real_slide_is_scipys():
    from pyfastscan.samples import skin_slide_path
    from pyfastscan.slide.tissue import otsu_tissue_mask

    s = open_slide(skin_slide_path())
    thumb, ds = s.thumbnail()
    s.close()
    want = _otsu_mask_reference(thumb)
    assert 0 < want.sum() < want.size  # tissue and glass both there
    assert np.array_equal(otsu_tissue_mask(thumb, ds).mask, want)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1.0, 3.7, 16.0]), st.integers(20, 99),
       st.sampled_from([1, 2, 4]), st.integers(1, 150), st.integers(1, 150), st.integers(1, 30),
       st.sampled_from([1.0, 0.5, 2.000337]), st.integers(0, 2**32 - 1))
def test_the_cells_on_tissue_of_all_rois_at_once_are_each_rois(h, w, ds, patch, alpha, n_rows, n_cols, L, scan_ds,
                                                               seed):
    """open_scan's one lookup per row of ROIs gives every ROI the mask cells_on_tissue gives it alone."""
    from pyfastscan.dense import Geometry
    from pyfastscan.masks import TissueMask
    from pyfastscan.pipeline.engine import plan_rois, rois_cells_on_tissue

    rng = np.random.default_rng(seed)
    tm = TissueMask(rng.random((h, w)) < rng.random() ** 2, ds)  # sparse too: rows of scattered ROIs
    g = Geometry(patch, 16, alpha)
    rois, _ = plan_rois(g, n_rows, n_cols, L, tm, scan_ds)
    got = rois_cells_on_tissue(g, tm, scan_ds, rois)
    assert sorted(got) == sorted((r.row, r.col) for r in rois)
    step = g.step * scan_ds
    for r in rois:  # each ROI's cells' boxes on their own
        want = tm.boxes_touching((r.col + np.arange(r.cols)) * step, (r.row + np.arange(r.rows)) * step,
                                 g.patch * scan_ds)
        assert got[(r.row, r.col)].shape == (r.rows, r.cols) and np.array_equal(got[(r.row, r.col)], want)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1.0, 3.7, 16.0]), st.integers(20, 99),
       st.sampled_from([1, 2, 4]), st.integers(1, 150), st.integers(1, 150), st.integers(1, 30),
       st.sampled_from([1.0, 0.5, 2.000337]), st.integers(0, 2**32 - 1))
def test_plan_rois_are_the_grids_rois_whose_input_touches_tissue(h, w, ds, patch, alpha, n_rows, n_cols, L,
                                                                 scan_ds, seed):
    """The plan (one summed-area lookup for the whole grid) keeps exactly the ROIs of the
    L x L grid whose input box meets tissue by TissueMask.any_in, row-major."""
    from pyfastscan.dense import Geometry
    from pyfastscan.masks import TissueMask
    from pyfastscan.pipeline.engine import Roi, plan_rois

    rng = np.random.default_rng(seed)
    tm = TissueMask(rng.random((h, w)) < rng.random(), ds)
    g = Geometry(patch, 16, alpha)
    want = []
    for a in range(-(-n_rows // L)):
        for b in range(-(-n_cols // L)):
            rows, cols = min(L, n_rows - a * L), min(L, n_cols - b * L)
            x, y, wi, hi = b * L * g.step, a * L * g.step, g.input_side(cols), g.input_side(rows)
            if tm.any_in(x * scan_ds, y * scan_ds, (x + wi) * scan_ds, (y + hi) * scan_ds):
                want.append(Roi(a * L, b * L, rows, cols, x, y, wi, hi))
    got, total = plan_rois(g, n_rows, n_cols, L, tm, scan_ds)
    assert got == want and total == -(-n_rows // L) * -(-n_cols // L)
    assert all(type(v) is int for r in got for v in r)

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.floats(0.5, 7), st.floats(0.1, 40), st.integers(0, 2**32 - 1))
def test_boxes_touching_equals_any_in(h, w, ds, side, seed):
    from pyfastscan.slide.tissue import TissueMask

    rng = np.random.default_rng(seed)
    tm = TissueMask(rng.random((h, w)) < 0.05, ds)
    xs, ys = rng.uniform(-20, 150, 7), rng.uniform(-20, 150, 5)
    ref = np.array([[tm.any_in(x, y, x + side, y + side) for x in xs] for y in ys])
    assert np.array_equal(tm.boxes_touching(xs, ys, side), ref)


def _jpeg_pyramid(path, h=1100, w=900, seed=1):
    """A JPEG-tiled two-level TIFF OpenSlide opens as generic-tiff: smooth tissue-like
    colour with noise, so the tiles carry detail."""
    from pyfastscan.io.images import write_pyramid_tif

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 60 * np.sin(yy / 37.0), 100 + 50 * np.cos(xx / 23.0), 160 + 40 * np.sin((xx + yy) / 51.0)],
                   axis=-1) + rng.normal(0, 12, (h, w, 3))
    return write_pyramid_tif(str(path), np.clip(img, 0, 255).astype(np.uint8), 0.5, levels=2, compression="jpeg")


def test_stored_levels_read_from_the_tiles_are_openslides_pixels(tmp_path):
    """A plain tiled TIFF's stored levels come from its tiles (each decoded once while
    cached), and every pixel equals OpenSlide's: inside, across tile borders, partly and
    wholly outside the level (white), on the generated TIFF and on the bundled Aperio SVS."""
    from pyfastscan.samples import skin_slide_path

    for path in (_jpeg_pyramid(tmp_path / "j.tif"), skin_slide_path()):
        s = open_slide(path)
        o = openslide.OpenSlide(path)
        for level in range(o.level_count):
            lw, lh = o.level_dimensions[level]
            ds = o.level_downsamples[level]
            for lx, ly, w, h in ((0, 0, lw, lh), (200, 130, 300, 260), (lw - 50, lh - 70, 120, 90), (lw + 5, 0, 40, 40),
                                 (-30, -20, 100, 80)):
                want = s.read(int(lx * ds), int(ly * ds), w, h, level)  # OpenSlide, composited on white
                assert np.array_equal(s.read_level(lx, ly, w, h, level), want), (path, level, lx, ly)
            assert isinstance(s._same_pixels[level], TiffFileSlide)  # the tile path was taken
        o.close()
        s.close()


def test_reader_threads_never_seek_beside_tifffile(tmp_path):
    """Segments are read at an offset through a descriptor of their own (pread), so a reader
    never moves tifffile's file position, which tifffile's delay-loaded tag values seek
    under its own lock; and each level's decoder is built when the slide opens: tifffile
    builds it on first use, reading tags, and a reader thread seeking meanwhile got another
    segment's bytes (CI: 'Not a JPEG file', 1 in 300 four-thread first reads). Where the OS
    has no pread, every seek-and-read holds tifffile's lock."""
    from concurrent.futures import ThreadPoolExecutor

    path = _jpeg_pyramid(tmp_path / "j.tif", 1024, 1024)
    want = TiffFileSlide(path).read_level(0, 0, 0, 1024, 1024)
    for no_pread in (False, True):
        t = TiffFileSlide(path)
        fh = t._tif.filehandle
        assert t._lock is fh.lock
        assert isinstance(fh.lock, type(threading.RLock()))  # a real lock, not tifffile's default NullContext
        assert all("decode" in p.__dict__ for p in t._pages)  # built, not left for a reader thread
        if no_pread:
            os.close(t._fd)
            t._fd = None
        else:
            assert t._fd is not None  # Linux has pread
        stop, moved = threading.Event(), []

        def tifffile_reading_tags():  # what tifffile does under its lock, while the readers run
            while not stop.is_set():
                with fh.lock:
                    fh.seek(3)
                    fh.read(5)
                    moved.append(fh.tell() != 8)  # a reader moved the position in between

        side = threading.Thread(target=tifffile_reading_tags)
        side.start()
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda y: t.read_level_rgb(0, 0, y, 1024, 256), range(0, 1024, 256)))
        stop.set()
        side.join(5)
        assert np.array_equal(np.concatenate(outs), want[..., :3]) and t._cache.decoded == 16
        assert moved and not any(moved)
        t.close()
        assert t._fd is None


def test_a_tiff_truncated_after_it_was_opened_is_a_slide_error_naming_the_segment(tmp_path):
    path = _jpeg_pyramid(tmp_path / "j.tif", 1024, 1024)
    t = TiffFileSlide(path)
    page = t._pages[0]
    last = int(np.argmax(page.dataoffsets))
    os.truncate(path, page.dataoffsets[last] + page.databytecounts[last] // 2)  # the last tile cut in half
    y, x = divmod(last % 16, 4)
    with pytest.raises(SlideError, match=f"segment {last} of level 0 .*truncated"):
        t.read_level_rgb(0, x * 256, y * 256, 256, 256)
    assert not t._cache._busy  # nothing left waiting
    t.close()


def test_each_tile_is_decoded_once_while_cached_and_the_cache_stays_bounded(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pyfastscan.slide.tiff import SegmentCache

    path = _jpeg_pyramid(tmp_path / "j.tif", 1024, 1024)
    t = TiffFileSlide(path)
    tiles = t._pages[0].databytecounts
    # overlapping regions (a 3 x 3 grid of 400 px ROIs at stride 300), read by 4 threads at once
    regions = [(x, y) for y in range(0, 700, 300) for x in range(0, 700, 300)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda r: t.read_level_rgb(0, r[0], r[1], 400, 400), regions))
    assert t._cache.decoded == len(tiles) == 16  # every tile met, each decoded once
    whole = t.read_level(0, 0, 0, 1024, 1024)[..., :3]
    assert t._cache.decoded == 16
    for (x, y), out in zip(regions, outs):
        assert np.array_equal(out, whole[y:y + 400, x:x + 400])
    t.close()

    small = SegmentCache(capacity=3 * 256 * 256 * 3)  # room for 3 decoded tiles
    t = TiffFileSlide(path)
    t._cache = small
    t.read_level_rgb(0, 0, 0, 1024, 256)  # 4 tiles in a row: the first is dropped
    assert small._bytes <= small.capacity and len(small._items) == 3 and small.decoded == 4
    t.read_level_rgb(0, 768, 0, 256, 256)  # the last one is still there
    assert small.decoded == 4
    t.read_level_rgb(0, 0, 0, 256, 256)  # the first is decoded again
    assert small.decoded == 5
    t.close()


def test_a_decoder_failure_reaches_every_thread_waiting_for_that_tile():
    import threading

    from pyfastscan.slide.tiff import SegmentCache

    cache, started, release = SegmentCache(), threading.Event(), threading.Event()
    calls = []

    def failing():
        calls.append(1)
        started.set()
        release.wait(5)
        raise SlideError("tile 0 is corrupt")

    errors = []

    def reader():
        try:
            cache.get(("l", 0), failing)
        except SlideError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    threads[0].start()
    assert started.wait(5)
    for th in threads[1:]:
        th.start()
    release.set()
    for th in threads:
        th.join(5)
    assert errors == ["tile 0 is corrupt"] * 3 and len(calls) == 3  # each waiter tried again and failed itself
    assert not cache._items and not cache._busy


def test_a_level_whose_tiles_are_not_openslides_pixels_stays_with_openslide(tmp_path, monkeypatch):
    import pyfastscan.slide.reader as reader

    path = _jpeg_pyramid(tmp_path / "j.tif")
    real = TiffFileSlide.read_level

    def off_by_one(self, level, lx, ly, w, h):  # a decoder that differs from OpenSlide's
        out = real(self, level, lx, ly, w, h)
        out[..., 0] ^= 1
        return out

    monkeypatch.setattr(TiffFileSlide, "read_level", off_by_one)
    monkeypatch.setattr(TiffFileSlide, "read_level_rgb", lambda *a: pytest.fail("the tile path was taken"))
    s = open_slide(path)
    assert reader._same_on_largest_tile(s.handle, s._exact_level_reader(0), 0) is False
    o = openslide.OpenSlide(path)
    assert np.array_equal(s.read_level(10, 20, 300, 200, 0), np.asarray(o.read_region((10, 20), 0, (300, 200)))[..., :3])
    assert s._same_pixels[0] is None
    o.close()
    s.close()
