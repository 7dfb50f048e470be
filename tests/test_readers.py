"""Slide readers (issue 17, item 7): what a reader must have (pyfastscan.slide.SlideReader),
resolution from OpenSlide, tiffslide and cuCIM keys, and the same map through tiffslide,
a minimal hand-written reader and OpenSlide."""
import numpy as np
import pytest
import torch

from helpers import ArraySlide
from pyfastscan import SlideError, open_slide, scan_slide
from pyfastscan.samples import skin_slide_path
from pyfastscan.slide import SlideReader
from test_scan import _model


class MinimalReader:
    """The four members of SlideReader and nothing else (no name, no close, RGB arrays)."""

    def __init__(self, rgb, properties):
        self._rgb = rgb
        self.level_dimensions = [(rgb.shape[1], rgb.shape[0])]
        self.level_downsamples = [1.0]
        self.properties = properties

    def read_region(self, location, level, size):
        (x, y), (w, h) = location, size
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        src = self._rgb[max(0, y):y + h, max(0, x):x + w]
        out[max(0, -y):max(0, -y) + src.shape[0], max(0, -x):max(0, -x) + src.shape[1]] = src
        return out


def _rgb():
    from pyfastscan.samples import carcinoma_image

    return np.ascontiguousarray(carcinoma_image()[:300, :260, :3])


@pytest.mark.parametrize("props,mpp", [
    ({"openslide.mpp-x": "0.25"}, 0.25),
    ({"tiffslide.mpp-x": 0.499, "tiffslide.mpp-y": 0.499}, 0.499),
    ({"aperio.MPP": "0.5"}, 0.5),
    ({"cucim.spacing": [0.2465, 0.2465, 1.0], "cucim.spacing_units": ["micrometer", "micrometer", "color"]}, 0.2465),
    ({"cucim": {"spacing": [0.00025, 0.00025, 1.0], "spacing_units": ["mm", "mm", "color"]}}, 0.25),
    ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, 0.25),
])
def test_resolution_from_each_readers_keys(props, mpp):
    s = open_slide(MinimalReader(_rgb(), props))
    assert s.mpp == pytest.approx(mpp, rel=1e-12)


def test_no_resolution_and_not_a_reader_are_clear_errors():
    with pytest.raises(SlideError, match="no resolution"):
        open_slide(MinimalReader(_rgb(), {"cucim.spacing": [1, 1], "cucim.spacing_units": ["pixel", "pixel"]}))

    class Half:
        level_dimensions = [(10, 10)]

        def read_region(self, *a):
            return None

    assert not isinstance(Half(), SlideReader)
    with pytest.raises(SlideError, match="Half object is neither a path nor a slide reader: it has no "
                                         "level_downsamples, properties"):
        open_slide(Half())


def test_the_same_map_through_a_minimal_reader_and_an_openslide_like_one():
    rgb = _rgb()
    kw = dict(alpha=1, progress=False, roi_outputs=8, precision="fp32")
    a = scan_slide(MinimalReader(rgb, {"openslide.mpp-x": "0.5"}), _model(torch.float32), **kw)
    b = scan_slide(ArraySlide(rgb, mpp=0.5), _model(torch.float32), **kw)
    assert np.array_equal(a.heatmap, b.heatmap)


def test_tiffslide_reads_the_bundled_slide_like_openslide():
    tiffslide = pytest.importorskip("tiffslide")
    t = tiffslide.TiffSlide(skin_slide_path())
    assert isinstance(t, SlideReader)
    s, o = open_slide(t), open_slide(skin_slide_path())
    assert s.mpp == o.mpp == pytest.approx(0.499)
    kw = dict(alpha=1, progress=False, roi_outputs=8, precision="fp32", scan_mpp=4.0)
    model = _model(torch.float32)
    a, b = scan_slide(t, model, **kw), scan_slide(skin_slide_path(), model, **kw)
    # the same decoded pixels inside the slide (checked), and beyond it white for both
    # (tiffslide pads with black, OpenSlide with transparent pixels): the same map
    assert np.array_equal(np.asarray(t.read_region((0, 0), 0, (300, 200)).convert("RGB")), s.read(0, 0, 300, 200))
    assert (s.read(-5, -5, 10, 10)[:5] == 255).all() and (s.read(2215, 2962, 10, 10)[5:, 5:] == 255).all()
    assert np.array_equal(a.heatmap, b.heatmap)
    t.read_region((0, 0), 0, (4, 4))  # the caller's reader is still open after the scans
