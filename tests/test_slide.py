"""Slide reading: the tifffile fallback for TIFFs OpenSlide refuses, and SubIFD pyramids
(OME-TIFF) that OpenSlide does not see (DESIGN.md 2.4)."""
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


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.floats(0.5, 7), st.floats(0.1, 40), st.integers(0, 2**32 - 1))
def test_boxes_touching_equals_any_in(h, w, ds, side, seed):
    from pyfastscan.slide.tissue import TissueMask

    rng = np.random.default_rng(seed)
    tm = TissueMask(rng.random((h, w)) < 0.05, ds)
    xs, ys = rng.uniform(-20, 150, 7), rng.uniform(-20, 150, 5)
    ref = np.array([[tm.any_in(x, y, x + side, y + side) for x in xs] for y in ys])
    assert np.array_equal(tm.boxes_touching(xs, ys, side), ref)
