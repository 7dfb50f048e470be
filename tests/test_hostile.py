"""Hostile inputs (issue 14): bad slides, weights, annotation files, option values and
output situations. Each is a one-line message naming the file or option, a documented
exit status (0 done, 1 some slides failed, 2 usage error, 3 internal error), no traceback
on the terminal, the other slides of the batch done, and nothing lost, replaced or
half-written presented as complete."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import ArraySlide, unwritable_folder
from test_scan import _model

tifffile = pytest.importorskip("tifffile")
openslide = pytest.importorskip("openslide")

from pyfastscan.cli import main  # noqa: E402

OUTPUTS = ("camelyon16_submission.csv", "detections.csv", "detections.geojson", "detections.xml", "heatmap.tif",
           "heatmap_contours.geojson", "heatmap_contours.xml", "overlay.png", "report.json")


def _tiled(path, img, mpp=0.5, compression="jpeg", **kw):
    """A tiled (64 px) TIFF OpenSlide opens as generic-tiff; ``mpp=None`` writes no resolution."""
    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    tifffile.imwrite(str(path), img, tile=(64, 64), compression=compression, photometric="rgb", **res, **kw)
    return str(path)


def _tissue(h=140, w=130, seed=0):
    """Background 240 with a block of "tissue": a few hundred px, one ROI for tellez_cnn."""
    img = np.full((h, w, 3), 240, dtype=np.uint8)
    img[10:h - 10, 10:w - 10] = np.random.default_rng(seed).integers(60, 200, (h - 20, w - 20, 3), dtype=np.uint8)
    return img


def _slide(path, seed=0, **kw):
    return _tiled(path, _tissue(seed=seed), **kw)


def _corrupt_tile(path, index):
    """Overwrite the last two thirds of one JPEG tile with end-of-image markers."""
    with tifffile.TiffFile(path) as t:
        off, n = t.pages[0].dataoffsets[index], t.pages[0].databytecounts[index]
    data = bytearray(open(path, "rb").read())
    k = n // 3
    data[off + k:off + n] = (b"\xff\xd9" * n)[:n - k]
    open(path, "wb").write(bytes(data))
    return path


def _scan(capsys, slides, out, weights, *extra):
    """Run `pyfastscan scan` in-process; (exit status, stdout, stderr)."""
    status = main(["scan", *map(str, slides), "--weights", weights, "--arch", "tellez_cnn", "--out", str(out),
                   "--quiet", *map(str, extra)])
    cap = capsys.readouterr()
    return status, cap.out, cap.err


def _no_traceback(err):
    assert "Traceback" not in err and 'File "' not in err, err


def _complete(folder):
    """The folder holds a finished result: every output, status done."""
    assert all(os.path.isfile(os.path.join(folder, f)) for f in OUTPUTS), os.listdir(folder)
    assert json.load(open(os.path.join(folder, "status.json")))["state"] == "done"


def _marked_failed(folder):
    assert not os.path.exists(os.path.join(folder, "report.json"))
    assert json.load(open(os.path.join(folder, "status.json")))["state"] == "failed"


# ---- 1. a failing slide is one line, and the batch goes on ----------------------------------------------------

def test_corrupt_jpeg_tile_fails_that_slide_and_the_batch_goes_on(tmp_path, capsys, weights):
    bad = _corrupt_tile(_slide(tmp_path / "bad.tif"), 3)
    good = _slide(tmp_path / "good.tif", seed=1)
    status, out, err = _scan(capsys, [bad, good], tmp_path / "out", weights)
    assert status == 1
    _no_traceback(err)
    line = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(line) == 1 and "bad.tif" in line[0] and "Corrupt JPEG" in line[0]
    _complete(tmp_path / "out" / "good")
    _marked_failed(tmp_path / "out" / "bad")


class _Raising(ArraySlide):
    def __init__(self, exc, after=0):
        super().__init__(_tissue())
        self.exc, self.calls, self.after = exc, 0, after

    def read_region(self, *args):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return super().read_region(*args)


@pytest.mark.parametrize("exc", [MemoryError(), IndexError("list index out of range"), TypeError("bad"),
                                 ZeroDivisionError("x"), openslide.OpenSlideError("Corrupt JPEG data")])
@pytest.mark.parametrize("after", [0, 1])  # in the thumbnail, or in the background ROI reader
def test_a_reader_raising_anything_is_a_slide_error(exc, after):
    from pyfastscan import SlideError, scan_slide

    with pytest.raises(SlideError, match="array-slide: "):
        scan_slide(_Raising(exc, after), _model(torch.float32), roi_outputs=3, progress=False)


def test_an_unexpected_error_is_exit_3_with_the_traceback_in_a_log(tmp_path, capsys, weights, monkeypatch):
    import pyfastscan.pipeline.outputs as outputs

    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(outputs, "write_overlay_png", broken)
    good = _slide(tmp_path / "a.tif")
    status, out, err = _scan(capsys, [good, _slide(tmp_path / "b.tif", seed=2)], tmp_path / "out", weights)
    assert status == 3
    _no_traceback(err)
    assert err.count("internal error") == 2 and "pyfastscan-error.log" in err
    log = open(tmp_path / "out" / "a" / "pyfastscan-error.log").read()
    assert "Traceback" in log and "a bug" in log
    _marked_failed(tmp_path / "out" / "a")


def test_exit_codes_are_in_the_help(capsys):
    assert main(["scan", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0 every slide done" in text and "1 some slides failed" in text and "3 internal error" in text


# ---- 3. no result is ever silently replaced ---------------------------------------------------------------------

def test_same_basename_in_two_folders_gets_two_output_folders(tmp_path, capsys, weights):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = _slide(tmp_path / "a" / "slide.tif", seed=1)
    b = _slide(tmp_path / "b" / "slide.tiff", seed=2)
    status, out, err = _scan(capsys, [a, b], tmp_path / "out", weights)
    assert status == 0, err
    _complete(tmp_path / "out" / "a" / "slide")
    _complete(tmp_path / "out" / "b" / "slide")
    assert json.load(open(tmp_path / "out" / "a" / "slide" / "report.json"))["slide"] == a


def test_two_slides_for_one_folder_is_a_usage_error(tmp_path, capsys, weights):
    a, b = _slide(tmp_path / "s.tif"), _slide(tmp_path / "s.tiff")
    status, out, err = _scan(capsys, [a, b], tmp_path / "out", weights)
    assert status == 2 and "would both write to" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_a_locked_folder_refuses_a_second_writer(tmp_path, capsys, weights):
    """A second scan into a folder another process is writing: refused at once, with a
    clear message; the first's files untouched."""
    import subprocess
    import sys

    folder = tmp_path / "out"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pyfastscan.io.files import FolderLock\n"
                               "with FolderLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, out, err = _scan(capsys, [_slide(tmp_path / "s.tif")], folder, weights)
    finally:
        holder.kill()
        holder.wait()
    assert status == 1 and "in use by another pyfastscan run" in err and f"pid {holder.pid}" in err
    _no_traceback(err)
    assert sorted(os.listdir(folder)) == [".pyfastscan.lock"]


def test_rerun_into_another_slides_or_runs_folder_needs_overwrite(tmp_path, capsys, weights):
    a, b = _slide(tmp_path / "a.tif", seed=1), _slide(tmp_path / "b.tif", seed=2)
    out = tmp_path / "out"
    assert _scan(capsys, [a], out, weights)[0] == 0
    before = {f: open(out / f, "rb").read() for f in OUTPUTS}
    status, _, err = _scan(capsys, [b], out, weights)  # another slide into a's folder
    assert status == 1 and "holds the results of another slide" in err and "--overwrite" in err
    status, _, err = _scan(capsys, [a], out, weights)  # the same slide again
    assert status == 1 and "holds the results of an earlier run" in err
    assert {f: open(out / f, "rb").read() for f in OUTPUTS} == before  # nothing replaced
    status, _, err = _scan(capsys, [b], out, weights, "--overwrite")
    assert status == 0, err
    _complete(out)
    assert json.load(open(out / "report.json"))["slide"] == b


def test_a_failed_folder_is_retried_without_overwrite(tmp_path, capsys, weights):
    bad = _corrupt_tile(_slide(tmp_path / "s.tif"), 3)
    out = tmp_path / "out"
    assert _scan(capsys, [bad], out, weights)[0] == 1
    _marked_failed(out)
    _slide(tmp_path / "s.tif")  # mended
    assert _scan(capsys, [bad], out, weights)[0] == 0
    _complete(out)


def test_a_read_only_folder_is_one_line(tmp_path, capsys, weights):
    out = unwritable_folder(tmp_path)
    status, _, err = _scan(capsys, [_slide(tmp_path / "s.tif"), _slide(tmp_path / "t.tif")], out, weights)
    assert status == 1 and err.count("FAILED") == 2 and "output folder" in err
    _no_traceback(err)


# ---- 4. a model that outputs NaN stops that slide -----------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_model_output_is_an_error_naming_the_roi(bad):
    from pyfastscan.errors import ModelOutputError
    from pyfastscan import scan_slide

    model = _model(torch.float32)
    with torch.no_grad():
        model[-1].bias[1] = bad
    with pytest.raises(ModelOutputError, match=r"array-slide: the model produced NaN.* in ROI \(row 0, col 0\)"):
        scan_slide(ArraySlide(_tissue()), model, roi_outputs=64, tissue_mask=np.ones((4, 4), bool), progress=False)


def test_nan_weights_fail_the_slide_and_write_nothing_complete(tmp_path, capsys, weights):
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    key = [k for k in state if k.endswith("bias")][-1]
    state[key][:] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(state, str(nan))
    status, out, err = _scan(capsys, [_slide(tmp_path / "s.tif"), _slide(tmp_path / "t.tif")], tmp_path / "out",
                             str(nan))
    assert status == 1 and err.count("the model produced NaN in ROI (row 0, col 0)") == 2
    _no_traceback(err)
    for name in ("s", "t"):
        _marked_failed(tmp_path / "out" / name)
        assert not os.path.exists(tmp_path / "out" / name / "heatmap.tif")


# ---- 7. outputs respect the umask ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_result():
    from pyfastscan import scan_slide

    return scan_slide(ArraySlide(_tissue()), _model(torch.float32), roi_outputs=64, progress=False)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(tmp_path, umask, small_result):
    res = small_result
    old = os.umask(umask)
    try:
        paths = res.save(str(tmp_path / "out"))
    finally:
        os.umask(old)
    for p in paths.values():
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, p
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".part")]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    from pyfastscan.io.files import atomic_write

    (tmp_path / "x.json").write_text("old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(str(tmp_path / "x.json"), boom)
    assert os.listdir(tmp_path) == ["x.json"] and (tmp_path / "x.json").read_text() == "old"


# ---- 8. weights files -------------------------------------------------------------------------------------------

class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _pickled_code(path):
    torch.save({"conv.weight": _Code()}, str(path))
    return str(path)


def test_a_pickle_with_code_is_refused_with_pyfastscans_own_advice(tmp_path, capsys):
    path = _pickled_code(tmp_path / "evil.pt")
    status, out, err = _scan(capsys, [_slide(tmp_path / "s.tif")], tmp_path / "out", path)
    assert status == 2
    _no_traceback(err)
    assert len(err.strip().splitlines()) == 1 and "evil.pt" in err and "code or Python objects" in err
    assert "safetensors" in err and "weights_only" not in err and "pwned" not in out
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind", ["wrong shapes", "not tensors", "garbage", "empty"])
def test_bad_weights_are_a_one_line_usage_error(tmp_path, capsys, weights, kind):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    if kind == "wrong shapes":
        state = load_file(weights)
        k = next(iter(state))
        state[k] = torch.zeros(3, 3)
        save_file(state, str(path))
    elif kind == "not tensors":
        path = tmp_path / "w.pt"
        torch.save({"a": [1, 2, 3]}, str(path))
    else:
        path.write_bytes(b"\x00garbage" * 10 if kind == "garbage" else b"")
    status, out, err = _scan(capsys, [_slide(tmp_path / "s.tif")], tmp_path / "out", str(path))
    assert status == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err
    _no_traceback(err)


# ---- 5. every numeric option validated once, in one place ----------------------------------------------------

BAD_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e400", "abc", "", "2.5", "1e9"]
SCAN_OPTIONS = ["--alpha", "--num-classes", "--mpp", "--scan-mpp", "--slide-mpp", "--memory-mib", "--threads", "--roi-outputs"]
MITOSIS_OPTIONS = ["--map-threshold", "--nms-um", "--delta", "--theta1", "--theta2"]


def _expect(option, text):
    """Whether validate.OPTIONS allows ``text`` for ``option`` (the oracle for the CLI)."""
    from pyfastscan.validate import OPTIONS

    name = option.lstrip("-").replace("-", "_")
    if name == "roi_outputs" and text == "auto":
        return True
    spec = OPTIONS[name]
    try:
        v = float(text)
    except ValueError:
        return False
    return spec.problem(v) is None


@pytest.mark.parametrize("option", SCAN_OPTIONS)
@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_scan_option_values(tmp_path, capsys, weights, option, value):
    missing = tmp_path / "missing.tif"  # a valid value reaches the slide, which fails at once (exit 1)
    status, out, err = _scan(capsys, [missing], tmp_path / "out", weights, f"{option}={value}")
    _no_traceback(err)
    if _expect(option, value):
        assert status == 1 and "missing.tif" in err
    else:
        assert status == 2 and len(err.strip().splitlines()) == 1 and option in err and "must be" in err, err


@pytest.mark.parametrize("option", MITOSIS_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "-0.5", "1", "1.5", "inf", "x"])
def test_bad_mitosis_option_values(tmp_path, capsys, weights, option, value):
    status = main(["mitosis", str(tmp_path / "missing.tif"), "--weights", weights, "--out", str(tmp_path / "o"),
                   "--quiet", "--theta1=0", "--theta2=1e9", f"{option}={value}"])
    err = capsys.readouterr().err
    _no_traceback(err)
    assert status == (1 if _expect(option, value) else 2), err
    if status == 2:
        assert option in err and len(err.strip().splitlines()) == 1


def test_theta1_above_theta2_is_a_usage_error(tmp_path, capsys, weights):
    status = main(["mitosis", str(tmp_path / "s.tif"), "--weights", weights, "--out", str(tmp_path / "o"),
                   "--theta1", "30", "--theta2", "20"])
    err = capsys.readouterr().err
    assert status == 2 and "--theta1 (30) must not exceed --theta2 (20)" in err


@pytest.mark.parametrize("argv", [
    ["froc", "--pred", "P", "--gt", "G", "--level=-1"], ["froc", "--pred", "P", "--gt", "G", "--level=nan"],
    ["froc", "--pred", "P", "--gt", "G", "--resolution=0"], ["froc", "--pred", "P", "--gt", "G", "--resolution=inf"],
    ["f1", "--pred", "P", "--gt", "G", "--radius-px=0"], ["f1", "--pred", "P", "--gt", "G", "--radius-um=nan"],
    ["f1", "--pred", "P", "--gt", "G", "--mpp=-1"], ["f1", "--pred", "P", "--gt", "G", "--threshold=nan"],
])
def test_bad_evaluate_option_values(capsys, argv):
    status = main(["evaluate", *argv])
    err = capsys.readouterr().err
    assert status == 2 and argv[-1].split("=")[0] in err and "must be" in err
    _no_traceback(err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kw", [dict(threshold=float("nan")), dict(threshold=-0.1), dict(alpha=0), dict(alpha=2.5),
                                dict(alpha=True), dict(mpp=float("nan")), dict(mpp=-1.0), dict(roi_outputs="7"),
                                dict(readers=0), dict(memory=-5), dict(positive_class=-1)])
def test_public_scan_arguments_are_validated_before_any_work(kw):
    from pyfastscan import InvalidArgumentError, scan_slide

    name = next(iter(kw))
    with pytest.raises(InvalidArgumentError, match=rf"^{name} must be .*, got"):
        scan_slide(_Raising(AssertionError("read before the arguments were checked")), _model(), **kw,
                   progress=False)


@pytest.mark.parametrize("kw", [dict(map_threshold=float("nan")), dict(delta=1.0), dict(nms_um=-1),
                                dict(step_um=0), dict(theta=(20, 6)), dict(theta=(float("nan"), 6))])
def test_public_mitosis_arguments_are_validated_before_any_work(kw):
    from pyfastscan import InvalidArgumentError, detect_mitoses

    with pytest.raises(InvalidArgumentError, match="theta|must be"):
        detect_mitoses(_Raising(AssertionError("read before the arguments were checked")), _model(), **kw,
                       progress=False)


@pytest.mark.parametrize("prob", ['"0.3"', "true", "null", "NaN", "[1]"])
def test_a_probability_that_is_not_a_number_is_refused(tmp_path, prob):
    from pyfastscan.eval.files import read_points
    from pyfastscan.io import AnnotationError

    path = tmp_path / "p.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point", '
                    f'"coordinates": [1, 2]}}, "properties": {{"probability": {prob}}}}}]}}')
    if prob == "null":  # no probability: the point counts (1.0)
        assert read_points(str(path))[1].tolist() == [1.0]
        return
    with pytest.raises(AnnotationError, match=r"p\.geojson.*(probability|NaN)"):
        read_points(str(path))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**6, 10**6).map(str),
                    st.text(max_size=6), st.sampled_from(["nan", "-inf", "1e400", "auto", "0x10", "1_0", " 3 "]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=st.lists(st.tuples(st.sampled_from(SCAN_OPTIONS + ["--per-slide-folder", "--quiet"]), _values),
                     max_size=3))
def test_fuzzed_scan_options_are_exit_0_1_or_2_never_a_traceback(tmp_path, capsys, weights, opts):
    argv = ["scan", str(tmp_path / "missing.tif"), "--weights", weights, "--out", str(tmp_path / "o")]
    argv += [o if o in ("--per-slide-folder", "--quiet") else f"{o}={v}" for o, v in opts]
    status = main(argv)
    err = capsys.readouterr().err
    assert status in (0, 1, 2), (argv, err)
    _no_traceback(err)


# ---- 2. slides of any size open with bounded memory; absurd headers refused ----------------------------------

def _sparse_huge(path, side=1_000_000, tile=4096):
    """A BigTIFF of side x side px whose tiles are all empty but the first: < 1 MB on disk."""
    n = (-(-side // tile)) ** 2

    def tiles():
        yield np.full((tile, tile, 3), 200, np.uint8)
        for _ in range(n - 1):
            yield None

    with tifffile.TiffWriter(str(path), bigtiff=True) as tif:
        tif.write(tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                  compression="zlib", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    return str(path)


_THUMB_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pyfastscan import open_slide
s = open_slide(sys.argv[1])
img, ds = s.thumbnail(int(sys.argv[2]))
print(s.dimensions[0], img.shape[0], img.shape[1], ds, *img[0, 0], *img[-1, -1])
"""


def test_a_huge_sparse_bigtiff_thumbnail_reads_bounded_memory(tmp_path):
    """10^12 px with no pyramid: level 0 alone would be 4 TB; the thumbnail is sampled
    under a 2 GiB address-space limit."""
    import subprocess
    import sys

    path = _sparse_huge(tmp_path / "huge.tif")
    assert os.path.getsize(path) < 1 << 20
    r = subprocess.run([sys.executable, "-c", _THUMB_UNDER_LIMIT, path, "96"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    w, th, tw, ds, *px = r.stdout.split()
    assert (int(w), int(th), int(tw)) == (10**6, 96, 96) and float(ds) == pytest.approx(10**6 / 96)
    assert px == ["255"] * 6  # sampled rows miss the one real tile: white where nothing was scanned


def test_band_and_whole_thumbnails_agree(monkeypatch):
    import pyfastscan.slide.reader as reader
    from pyfastscan import open_slide

    img = np.random.default_rng(3).integers(0, 256, (333, 301, 3), dtype=np.uint8)
    whole = open_slide(ArraySlide(img)).thumbnail(40)
    monkeypatch.setattr(reader, "THUMBNAIL_BAND_BYTES", 9 * 301 * 4 * 2)  # two block rows a band
    banded = open_slide(ArraySlide(img)).thumbnail(40)
    assert np.array_equal(whole[0], banded[0]) and whole[1] == banded[1]
    monkeypatch.setattr(reader, "THUMBNAIL_BAND_BYTES", 100)  # sampled: the centre pixel of each block
    sampled, ds = open_slide(ArraySlide(img)).thumbnail(40)
    centre = lambda n, k: np.minimum(np.arange(k) * 9 + 4, n - 1)  # noqa: E731
    assert sampled.shape == (37, 34, 3) and ds == 301 / 34
    assert np.array_equal(sampled, img[centre(333, 37)][:, centre(301, 34)])


def _with_header_width(path, width):
    """Patch ImageWidth (tag 256, LONG) of a classic little-endian TIFF in place."""
    import struct

    data = bytearray(open(path, "rb").read())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack_from("<HH", data, e)
        if tag == 256:
            struct.pack_into("<HHII", data, e, 256, 4, 1, width)
    open(path, "wb").write(bytes(data))
    return path


def test_an_absurd_header_size_is_refused_as_such(tmp_path, capsys, weights):
    bad = _with_header_width(_slide(tmp_path / "absurd.tif"), 4_000_000_000)
    status, out, err = _scan(capsys, [bad, _slide(tmp_path / "ok.tif", seed=1)], tmp_path / "out", weights)
    assert status == 1
    _no_traceback(err)
    line = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(line) == 1 and "absurd.tif" in line[0], err
    _complete(tmp_path / "out" / "ok")


def test_a_header_beyond_max_side_is_a_slide_error():
    from pyfastscan import SlideError, open_slide

    class Absurd(ArraySlide):
        pass

    s = Absurd(_tissue())
    s.level_dimensions = [(2**31 - 1, 2**31 - 1)]
    with pytest.raises(SlideError, match="more than 10,000,000 px a side"):
        open_slide(s)
    s.level_dimensions = [(0, 5)]
    with pytest.raises(SlideError, match="not a slide's size"):
        open_slide(s)


@pytest.mark.parametrize("kind", ["truncated", "no resolution", "not a slide", "directory"])
def test_unusable_slides_are_one_line_and_the_batch_goes_on(tmp_path, capsys, weights, kind):
    path = tmp_path / "bad.tif"
    if kind == "truncated":
        _slide(path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "no resolution":
        _slide(path, mpp=None)
    elif kind == "not a slide":
        path.write_text("hello")
    else:
        path.mkdir()
    status, out, err = _scan(capsys, [path, _slide(tmp_path / "ok.tif", seed=1)], tmp_path / "out", weights)
    assert status == 1
    _no_traceback(err)
    line = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(line) == 1 and "bad.tif" in line[0], err
    _complete(tmp_path / "out" / "ok")


# ---- 9. the memory budget respects cgroup and RLIMIT_AS limits ------------------------------------------------

def _fake_system(tmp_path, cgroup_line, files):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_line)
    (proc / "meminfo").write_text("MemTotal: 64000000 kB\nMemAvailable: 32000000 kB\n")
    (proc / "self" / "status").write_text("VmSize: 1000 kB\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(root), str(proc)


def test_cgroup_v2_and_v1_limits_minus_usage(tmp_path):
    from pyfastscan.pipeline.memory import available_memory, cgroup_available

    root, proc = _fake_system(tmp_path / "v2", "0::/job\n", {"job/memory.max": str(3 << 30),
                                                              "job/memory.current": str(1 << 30)})
    assert cgroup_available(root, proc) == 2 << 30 and available_memory(root, proc) <= 2 << 30
    root, proc = _fake_system(tmp_path / "v1", "4:memory:/docker/x\n",
                              {"memory/docker/x/memory.limit_in_bytes": str(512 << 20),
                               "memory/docker/x/memory.usage_in_bytes": str(128 << 20)})
    assert cgroup_available(root, proc) == 384 << 20
    root, proc = _fake_system(tmp_path / "none", "0::/\n", {"memory.max": "max"})
    assert cgroup_available(root, proc) is None
    root, proc = _fake_system(tmp_path / "v1none", "4:memory:/\n", {"memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert cgroup_available(root, proc) is None


def test_the_budget_follows_ulimit_v(tmp_path):
    import subprocess
    import sys

    code = "import resource, os\nfrom pyfastscan.pipeline.memory import address_space_available\n" \
           "used = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n" \
           "resource.setrlimit(resource.RLIMIT_AS, (used + (200 << 20),) * 2)\n" \
           "from pyfastscan.pipeline.engine import memory_budget\n" \
           "print(address_space_available(), memory_budget('cpu'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    left, budget = map(int, r.stdout.split())
    assert 0 <= left <= 200 << 20 and budget <= left // 4 + 1


# ---- 6. resolution: --scan-mpp, --slide-mpp, the model's resolution, evaluate froc ------------------------------

def test_scan_mpp_and_slide_mpp_are_separate(small_result):
    from pyfastscan import scan_slide

    model, mask = _model(torch.float32), np.ones((4, 4), bool)
    kw = dict(roi_outputs=64, tissue_mask=mask, progress=False)
    own = ArraySlide(_tissue(), mpp=0.25)
    res = scan_slide(own, model, scan_mpp=0.5, slide_mpp=9.0, **kw)  # the slide's own 0.25 is kept
    assert (res.slide_mpp, res.scan_mpp) == (0.25, 0.5)
    res = scan_slide(ArraySlide(_tissue(), mpp=None), model, slide_mpp=0.25, scan_mpp=0.5, **kw)
    assert (res.slide_mpp, res.scan_mpp) == (0.25, 0.5)
    res = scan_slide(ArraySlide(_tissue(), mpp=None), model, mpp=0.4, **kw)  # the old option: both
    assert (res.slide_mpp, res.scan_mpp) == (0.4, 0.4)


def test_the_models_resolution_is_the_default_and_a_mismatch_warns():
    from pyfastscan import scan_slide

    kw = dict(roi_outputs=64, tissue_mask=np.ones((4, 4), bool), progress=False)
    res = scan_slide(ArraySlide(_tissue(), mpp=0.25), _model(torch.float32), model_mpp=0.5, **kw)
    assert res.scan_mpp == 0.5
    with pytest.warns(UserWarning, match=r"scanning at 0.25 um/px, but the model was trained at 0.5 um/px"):
        scan_slide(ArraySlide(_tissue(), mpp=0.25), _model(torch.float32), model_mpp=0.5, scan_mpp=0.25, **kw)


def test_cli_scan_mpp_slide_mpp_and_the_deprecated_mpp(tmp_path, capsys, weights):
    bare = _slide(tmp_path / "bare.tif", mpp=None)
    status, _, err = _scan(capsys, [bare], tmp_path / "o1", weights)
    assert status == 1 and "--slide-mpp" in err
    status, _, err = _scan(capsys, [bare], tmp_path / "o2", weights, "--slide-mpp", "0.25", "--scan-mpp", "0.3")
    assert status == 0, err
    rep = json.load(open(tmp_path / "o2" / "report.json"))
    assert (rep["slide_mpp"], rep["scan_mpp"]) == (0.25, 0.3)
    status, _, err = _scan(capsys, [bare], tmp_path / "o3", weights, "--mpp", "0.25")
    assert status == 0 and "--mpp is deprecated: use --scan-mpp" in err
    assert json.load(open(tmp_path / "o3" / "report.json"))["slide_mpp"] == 0.25
    # the cohort takes the scan's options, and says the same of --mpp
    status = main(["cohort", str(bare), "--weights", weights, "--arch", "tellez_cnn", "--out", str(tmp_path / "c"),
                   "--quiet", "--mpp", "0.25"])
    err = capsys.readouterr().err
    assert status == 0 and "pyfastscan cohort: --mpp is deprecated: use --scan-mpp" in err, err
    assert json.load(open(tmp_path / "c" / "bare" / "report.json"))["slide_mpp"] == 0.25


def test_froc_takes_the_resolution_from_report_json(tmp_path, capsys):
    pred = tmp_path / "pred" / "tumor_001"
    pred.mkdir(parents=True)
    (pred / "detections.csv").write_text("0.9,100.0,100.0\n")
    (pred / "report.json").write_text(json.dumps({"slide_mpp": 0.5, "slide_size_px": [2048, 2048]}))
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "tumor_001.xml").write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="Tumor">'
        '<Coordinates><Coordinate Order="0" X="50" Y="50"/><Coordinate Order="1" X="1500" Y="50"/>'
        '<Coordinate Order="2" X="1500" Y="1500"/><Coordinate Order="3" X="50" Y="1500"/></Coordinates>'
        '</Annotation></Annotations><AnnotationGroups/></ASAP_Annotations>')
    out = tmp_path / "froc.json"
    status = main(["evaluate", "froc", "--pred", str(tmp_path / "pred"), "--gt", str(gt), "--level", "2",
                   "--json", str(out), "--plot", str(tmp_path / "f.png")])
    err = capsys.readouterr().err
    assert status == 0, err
    assert json.load(open(out))["resolution_per_slide"] == {"tumor_001": 0.5}
    status = main(["evaluate", "froc", "--pred", str(tmp_path / "pred"), "--gt", str(gt), "--level", "2",
                   "--resolution", "0.243", "--json", str(out), "--plot", str(tmp_path / "f.png")])
    capsys.readouterr()
    assert status == 0 and json.load(open(out))["resolution_per_slide"] == {"tumor_001": 0.243}
