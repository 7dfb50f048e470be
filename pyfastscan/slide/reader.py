"""Open a whole-slide image and read RGB regions at a resolution (DESIGN.md 2.4).

``open_slide`` takes a path (read with OpenSlide; TIFFs OpenSlide refuses are read with
tifffile, see tiff.py) or any object with OpenSlide's reading
interface (``level_dimensions``, ``level_downsamples``, ``read_region``, ``properties``),
so tiffslide or cuCIM users can pass theirs.
"""
import contextlib
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from ..errors import NoResolutionError, PyfastscanError, SlideError  # noqa: F401 (SlideError re-exported here)

THUMBNAIL_BAND_BYTES = 64 << 20  # the most a thumbnail reads at once
MAX_SIDE = 10_000_000  # px: 1 m at 0.1 um/px; a header saying more is not a slide's


@runtime_checkable
class SlideReader(Protocol):
    """What ``open_slide`` needs of a slide object: OpenSlide's reading interface, which
    openslide.OpenSlide, tiffslide.TiffSlide and pyfastscan's own tifffile reader have (a
    cuCIM CuImage needs a small adapter that exposes these four).

    Attributes:
        level_dimensions: (width, height) of each level, level 0 first.
        level_downsamples: level-0 pixels per pixel of each level (1.0 first, increasing).
        properties: a mapping of metadata; the level-0 resolution is read from
            ``openslide.mpp-x``, ``tiffslide.mpp-x``, ``aperio.MPP``, cuCIM's
            ``cucim.spacing`` (with ``cucim.spacing_units``, also nested as
            ``{"cucim": {"spacing": ...}}``) or ``tiff.XResolution`` (with
            ``tiff.ResolutionUnit``), in that order; or pass ``mpp=``.

    ``read_region((x, y), level, (w, h))`` returns the RGBA (or RGB) pixels of the w x h
    region of ``level`` whose top-left corner is (x, y) in level-0 pixels, as a PIL image
    or an (h, w, 3 or 4) uint8 array. ``close()`` is optional.
    """

    level_dimensions: Sequence[Tuple[int, int]]
    level_downsamples: Sequence[float]
    properties: Mapping[str, Any]

    def read_region(self, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> Any:
        ...


_INTERFACE = ("level_dimensions", "level_downsamples", "read_region", "properties")  # SlideReader's members


@dataclass
class Slide:
    """A slide opened for scanning. ``mpp`` is the level-0 resolution in um/px."""

    handle: Any
    name: str
    mpp: float
    path: Optional[str] = None  # the file, when opened from one (read_level reads its TIFF pages)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)
    _same_pixels: dict = field(default_factory=dict, repr=False, compare=False)  # level -> tile reader or None
    _routes: dict = field(default_factory=dict, repr=False, compare=False)  # level -> how read_level reads it

    @property
    def dimensions(self) -> Tuple[int, int]:
        return tuple(self.handle.level_dimensions[0])

    @property
    def level_count(self) -> int:
        return len(self.handle.level_dimensions)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% slack)."""
        best = 0
        for i, d in enumerate(self.handle.level_downsamples):
            if d <= downsample * 1.01 and d >= self.handle.level_downsamples[best]:
                best = i
        return best

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the region whose top-left corner is (x, y) in level-0
        pixels, w x h pixels of ``level``; transparent (unscanned) pixels become white."""
        with self._reading(x, y, w, h, level):
            region = np.asarray(self.handle.read_region((int(x), int(y)), level, (int(w), int(h))))
        return self._white_outside(self._composite(region, w, h, level), x, y, level)

    def _white_outside(self, rgb: np.ndarray, x: int, y: int, level: int) -> np.ndarray:
        """Pixels beyond the level's extent are white, whatever the reader returns there
        (OpenSlide: transparent, composited to white; tiffslide: opaque black)."""
        ds = float(self.handle.level_downsamples[level])
        lw, lh = (int(v) for v in self.handle.level_dimensions[level])
        h, w = rgb.shape[:2]
        lx, ly = x / ds, y / ds  # the region's origin in level pixels
        c0, c1 = (min(w, max(0, math.ceil(v))) for v in (-lx, lw - lx))
        r0, r1 = (min(h, max(0, math.ceil(v))) for v in (-ly, lh - ly))
        if (c0, c1, r0, r1) == (0, w, 0, h):
            return rgb
        out = np.full_like(rgb, 255)  # a new array: a reader's may be read-only
        out[r0:r1, c0:c1] = rgb[r0:r1, c0:c1]
        return out

    @contextlib.contextmanager
    def _reading(self, x, y, w: int, h: int, level: int, where: str = ""):
        """Turn a reader's exception (a reader may raise anything: OpenSlideError for a
        corrupt JPEG tile, ...) into a SlideError naming the slide and the region."""
        try:
            yield
        except PyfastscanError:
            raise
        except MemoryError:
            raise SlideError(f"{self.name}: a {w} x {h} px region of level {level} does not fit in memory") from None
        except Exception as exc:
            raise SlideError(f"{self.name}: cannot read the {w} x {h} px region at ({x}, {y}){where} of level {level}: "
                             f"{type(exc).__name__}: {exc}") from None

    def _composite(self, region: np.ndarray, w: int, h: int, level: int) -> np.ndarray:
        """RGB of a reader's (h, w, 3 or 4) uint8 region, checked; transparent pixels on white."""
        if region.ndim != 3 or region.shape[:2] != (int(h), int(w)) or region.dtype != np.uint8:
            raise SlideError(f"{self.name}: the reader returned {region.dtype} {region.shape} for a {w} x {h} px "
                             f"region of level {level}, not uint8 ({h}, {w}, 3 or 4)")
        rgb = np.ascontiguousarray(region[..., :3])
        if region.shape[2] != 4:
            return rgb
        alpha = region[..., 3]
        lo, hi = alpha.min(initial=255), alpha.max(initial=255)
        if lo == 255:
            return rgb
        if hi == 0:  # nothing scanned here (outside the image, sparse tiles): white
            rgb.fill(255)
            return rgb
        # composite on white (opaque pixels come out unchanged), in whole-array passes:
        # boolean indexing of the non-opaque pixels is ~20x slower on long rows
        w = alpha[..., None].astype(np.uint16)
        return ((rgb * w + 255 * (255 - w) + 127) // 255).astype(np.uint8)

    def read_level(self, lx: int, ly: int, w: int, h: int, level: int) -> np.ndarray:
        """RGB uint8 (h, w, 3): the pixels [lx, lx + w) x [ly, ly + h) of ``level`` in that
        level's own coordinates, as stored, so that a pixel is the same whichever region
        reads it. OpenSlide takes level-0 locations and bilinearly resamples a level whose
        downsample is not an integer (2.0017 for a 1501 px wide TIFF) by the fraction the
        location falls between its pixels; such levels of a TIFF are read with tifffile
        (:class:`~pyfastscan.slide.tiff.TiffFileSlide`) instead. Where that is not possible
        (another format), the level is read in blocks of ``LEVEL_BLOCK`` pixels at fixed
        origins, so each pixel still has one value, OpenSlide's. A level OpenSlide reads as
        stored comes from the TIFF's tiles when they are OpenSlide's pixels, which is
        several times faster (:meth:`_same_pixels_reader`)."""
        ds, stored, exact, index = self._route(level)
        if exact is None and stored:
            return self.read(int(lx * ds), int(ly * ds), w, h, level)
        if exact is not None:
            with self._reading(lx, ly, w, h, level, " (level pixels)"):
                fast = getattr(exact, "read_level_rgb", None)  # a caller's reader may have read_level only
                rgb = None if fast is None else fast(index, lx, ly, w, h)
                if rgb is not None:
                    return rgb
                region = exact.read_level(index, lx, ly, w, h)
            return self._composite(region, w, h, level)
        out = np.empty((h, w, 3), dtype=np.uint8)
        B = LEVEL_BLOCK
        for by in range(ly // B, (ly + h - 1) // B + 1):
            for bx in range(lx // B, (lx + w - 1) // B + 1):
                block = self.read(int(round(bx * B * ds)), int(round(by * B * ds)), B, B, level)
                y0, y1 = max(ly, by * B), min(ly + h, (by + 1) * B)
                x0, x1 = max(lx, bx * B), min(lx + w, (bx + 1) * B)
                out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = block[y0 - by * B:y1 - by * B, x0 - bx * B:x1 - bx * B]
        return out

    def _route(self, level: int):
        """(downsample, read as stored?, tile reader or None, its index of ``level``), found
        once per level: OpenSlide gives a level's size and downsample through ctypes calls,
        which the reader threads would otherwise make on every read, each giving up and
        retaking the GIL (two readers of cached tiles ran slower than one)."""
        route = self._routes.get(level)
        if route is None:
            ds = float(self.handle.level_downsamples[level])
            stored = self._stored(level)
            exact = self._same_pixels_reader(level) if stored else self._exact_level_reader(level)
            index = None if exact is None else exact_level_index(exact, self.handle, level)
            route = self._routes[level] = (ds, stored, exact, index)
        return route

    def _exact_level_reader(self, level: int):
        """A tifffile reader of this slide's file whose pages hold ``level`` as stored, or
        None (not a TIFF, or its pages do not match the level)."""
        with self._lock:  # reader threads ask at once
            if not hasattr(self, "_exact"):
                self._exact = self._open_exact()
        if self._exact is None or exact_level_index(self._exact, self.handle, level) is None:
            return None
        return self._exact

    def _stored(self, level: int) -> bool:
        """Does OpenSlide read ``level`` as stored (level 0, or an integer downsample)?"""
        return level == 0 or float(self.handle.level_downsamples[level]).is_integer()

    def _same_pixels_reader(self, level: int):
        """For a level OpenSlide reads as stored: the tifffile reader when it gives the same
        pixels, or None (read with OpenSlide). OpenSlide composites every region through
        its tile cache and cairo (0.78 s for the 196 ROIs of bench_scan's slide on one core,
        against 0.12 s to decode their 624 JPEG tiles), so a plain tiled TIFF (OpenSlide
        vendors ``generic-tiff`` and ``aperio``) is read from its tiles, each decoded once
        while cached (:class:`~pyfastscan.slide.tiff.SegmentCache`). Checked once per level
        on the level's largest tile (the most detail): both readers must return the same
        RGBA there, else the level stays with OpenSlide."""
        checked = self._same_pixels
        with self._lock:
            if level in checked:
                return checked[level]
        reader = None
        props = getattr(self.handle, "properties", {})
        if type(self.handle).__module__.startswith("openslide") and \
                props.get("openslide.vendor") in SAME_PIXEL_VENDORS:
            exact = self._exact_level_reader(level)
            if exact is not None and _same_on_largest_tile(self.handle, exact, level):
                reader = exact
        with self._lock:
            checked[level] = reader
        return reader

    def _open_exact(self):
        if hasattr(self.handle, "read_level"):
            return self.handle
        if self.path is not None:
            from .tiff import TiffFileSlide, is_tiff

            try:
                if is_tiff(self.path):
                    return TiffFileSlide(self.path)
            except Exception:  # not readable that way: read_level's block reads
                return None
        return None

    def thumbnail(self, max_side: int = 1024) -> Tuple[np.ndarray, float]:
        """(RGB image of at most ``max_side`` pixels a side, its downsample from level 0):
        the coarsest level at least ``max_side`` pixels on its longer side (or level 0 for
        small slides), box-averaged by the smallest integer factor that brings it to size.

        Memory stays bounded whatever the slide's size: the level is read in bands of
        whole factor-row blocks of at most THUMBNAIL_BAND_BYTES (the same image as one
        read); when even one block row is larger than that (a slide of a million pixels a
        side with no pyramid), the thumbnail is sampled instead: one level row per
        thumbnail row, at the centre of its block, read in chunks, every factor-th pixel."""
        from PIL import Image

        w0, h0 = self.dimensions
        level = 0
        for i, (w, h) in enumerate(self.handle.level_dimensions):
            if max(w, h) >= min(max_side, max(w0, h0)):
                level = i
        w, h = (int(v) for v in self.handle.level_dimensions[level])
        ds = self.handle.level_downsamples[level]
        factor = max(1, -(-max(w, h) // max_side))
        tw, th = -(-w // factor), -(-h // factor)
        out = np.empty((th, tw, 3), dtype=np.uint8)
        if factor * w * 4 <= THUMBNAIL_BAND_BYTES:
            rows = max(1, THUMBNAIL_BAND_BYTES // (factor * w * 4)) * factor  # whole blocks per band
            stored = self._stored(level)  # then read_level gives the same pixels, from the tiles
            for y in range(0, h, rows):
                n = min(rows, h - y)
                band = self.read_level(0, y, w, n, level) if stored else self.read(0, int(y * ds), w, n, level)
                if factor > 1:
                    band = np.asarray(Image.fromarray(band).reduce(factor))
                out[y // factor:y // factor + band.shape[0]] = band
        else:
            chunk = max(factor, THUMBNAIL_BAND_BYTES // 4 // factor * factor)  # level pixels per read
            centre = lambda k, n: np.minimum(np.arange(k) * factor + factor // 2, n - 1)  # noqa: E731
            xs = centre(tw, w)
            for i, y in enumerate(centre(th, h)):
                for x in range(0, w, chunk):
                    n = min(chunk, w - x)
                    pick = (xs >= x) & (xs < x + n)
                    out[i, pick] = self.read(int(x * ds), int(y * ds), n, 1, level)[0, xs[pick] - x]
        return out, w0 / tw

    def close(self) -> None:
        """Close what this Slide opened; a reader the caller passed in stays open (theirs)."""
        close = getattr(self.handle, "close", None) if self.path is not None else None
        if close is not None:
            close()
        exact = getattr(self, "_exact", None)
        if exact is not None and exact is not self.handle:
            exact.close()


LEVEL_BLOCK = 512  # level pixels: the fixed block grid of Slide.read_level's fallback
SAME_PIXEL_VENDORS = ("generic-tiff", "aperio")  # plain tiled TIFFs: tiles as stored are OpenSlide's pixels


def _same_on_largest_tile(handle, exact, level: int) -> bool:
    """Do OpenSlide (``handle``) and the tifffile reader return the same RGBA over the
    level's largest tile (by stored bytes)?"""
    index = exact_level_index(exact, handle, level)
    page = exact._pages[index]
    if not page.is_tiled or not len(page.databytecounts):
        return False
    i = int(np.argmax(page.databytecounts))
    nx = -(-page.imagewidth // page.tilewidth)
    ty, tx = divmod(i % (nx * -(-page.imagelength // page.tilelength)), nx)
    x, y = tx * page.tilewidth, ty * page.tilelength
    w, h = min(page.tilewidth, page.imagewidth - x), min(page.tilelength, page.imagelength - y)
    ds = float(handle.level_downsamples[level])
    try:
        theirs = np.asarray(handle.read_region((int(x * ds), int(y * ds)), level, (w, h)))
        ours = exact.read_level(index, x, y, w, h)
    except Exception:  # either cannot read it: keep OpenSlide, whose errors the scan reports
        return False
    return theirs.shape == ours.shape and bool(np.array_equal(theirs, ours))


def exact_level_index(reader, handle, level: int) -> Optional[int]:
    """The level of ``reader`` (a TiffFileSlide) with the same size as ``handle``'s ``level``."""
    want = tuple(int(v) for v in handle.level_dimensions[level])
    for i, dims in enumerate(reader.level_dimensions):
        if tuple(int(v) for v in dims) == want:
            return i
    return None


def _check_geometry(name: str, handle) -> None:
    """Refuse a header whose sizes make no sense for a slide (empty, negative, more than
    MAX_SIDE pixels a side, levels not shrinking), before anything is read or allocated."""
    dims, dss = list(handle.level_dimensions), list(handle.level_downsamples)
    if not dims or len(dims) != len(dss):
        raise SlideError(f"{name}: the slide has no image levels ({len(dims)} sizes, {len(dss)} downsamples)")
    for i, ((w, h), d) in enumerate(zip(dims, dss)):
        if not (isinstance(w, (int, np.integer)) and isinstance(h, (int, np.integer))) or w < 1 or h < 1:
            raise SlideError(f"{name}: level {i} is {w} x {h} px in the header: not a slide's size")
        if w > MAX_SIDE or h > MAX_SIDE:
            raise SlideError(f"{name}: the header says level {i} is {w} x {h} px, more than {MAX_SIDE:,} px a side: "
                             "a corrupt header, not a slide")
        if not (np.isfinite(d) and d >= 1 - 1e-6) or (i and d < dss[i - 1]):
            raise SlideError(f"{name}: level {i} has downsample {d!r} in the header: not a pyramid")


_UM_PER_UNIT = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "\u00b5m": 1.0, "millimeter": 1e3, "mm": 1e3,
                "nanometer": 1e-3, "nm": 1e-3}


def _cucim_mpp(props) -> Optional[float]:
    """um/px from cuCIM's metadata: ``spacing`` (y, x, ...) with ``spacing_units``, as
    flat ``cucim.spacing`` keys or nested under ``cucim``."""
    nested = props.get("cucim") if isinstance(props.get("cucim"), Mapping) else {}
    spacing = props.get("cucim.spacing", nested.get("spacing"))
    units = props.get("cucim.spacing_units", nested.get("spacing_units"))
    try:
        value, unit = float(spacing[1]), str(units[1]).lower()
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return value * _UM_PER_UNIT[unit] if unit in _UM_PER_UNIT else None


def _mpp_from_properties(props) -> Optional[float]:
    if not hasattr(props, "get"):
        return None
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP", "cucim.spacing", "tiff.XResolution"):
        if key == "cucim.spacing":
            v = _cucim_mpp(props)
            if v is not None and v > 0 and np.isfinite(v):
                return v
            continue
        v = props.get(key)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if key == "tiff.XResolution":
            unit = props.get("tiff.ResolutionUnit", "")
            if v <= 0 or unit not in ("centimeter", "inch"):
                continue
            v = (1e4 if unit == "centimeter" else 25400.0) / v
        if v > 0:
            return v
    return None


def _tifffile_fallback(path: str, openslide_error: Exception):
    """A TIFF OpenSlide refused, read with tifffile; SlideError with both reasons if that fails too."""
    import openslide

    from .tiff import TiffFileSlide, is_tiff

    unsupported = isinstance(openslide_error, openslide.OpenSlideUnsupportedFormatError)
    why = "unsupported format" if unsupported else str(openslide_error)
    if not is_tiff(path):
        raise SlideError(f"{path}: not a slide OpenSlide can read ({why}; unsupported or corrupt file)") from None
    try:
        return TiffFileSlide(path)
    except Exception as exc:  # tifffile raises many types for truncated / corrupt files
        raise SlideError(f"{path}: a TIFF neither OpenSlide ({why}) nor tifffile ({type(exc).__name__}: {exc}) "
                         "can read: truncated, corrupt or an unsupported layout") from None


def open_slide(slide, mpp: Optional[float] = None, default_mpp: Optional[float] = None) -> Slide:
    """Open ``slide`` (a path, or an object with OpenSlide's reading interface).

    Args:
        mpp: level-0 um/px; overrides the slide's own.
        default_mpp: level-0 um/px used only when the slide has no resolution of its own.
    Raises:
        SlideError naming the file and the reason: missing, not a slide / corrupt, no
        resolution (pass mpp / --mpp).
    """
    from ..validate import check_optional

    check_optional("mpp", mpp)
    check_optional("default_mpp", default_mpp)
    if isinstance(slide, SlideReader):
        handle, name = slide, getattr(slide, "name", type(slide).__name__)
    elif not isinstance(slide, (str, bytes, os.PathLike)):
        missing = ", ".join(a for a in _INTERFACE if not hasattr(slide, a))
        raise SlideError(f"a {type(slide).__name__} object is neither a path nor a slide reader: it has no {missing} "
                         "(see pyfastscan.slide.SlideReader for what a reader needs)")
    else:
        path = os.fsdecode(slide)
        name = path
        if not os.path.exists(path):
            raise SlideError(f"{path}: no such file")
        if os.path.isdir(path):
            raise SlideError(f"{path}: is a directory, not a slide")
        try:
            import openslide
        except ImportError as exc:
            raise SlideError(f"{path}: OpenSlide is not installed ({exc}); pip install openslide-python "
                             "openslide-bin") from None
        try:
            handle = openslide.OpenSlide(path)
        except openslide.OpenSlideError as exc:
            handle = _tifffile_fallback(path, exc)
        except Exception as exc:  # OpenSlide raises others for some corrupt files
            raise SlideError(f"{path}: cannot open: {type(exc).__name__}: {exc}") from None
    try:
        _check_geometry(name, handle)
        own = _mpp_from_properties(handle.properties)
    except Exception as exc:
        if handle is not slide:
            handle.close()
        if isinstance(exc, SlideError):
            raise
        raise SlideError(f"{name}: cannot read the slide's properties: {type(exc).__name__}: {exc}") from None
    chosen = mpp if mpp is not None else own if own is not None else default_mpp
    if chosen is not None and not (isinstance(chosen, (int, float)) and chosen > 0 and np.isfinite(chosen)):
        raise SlideError(f"{name}: mpp must be a positive number, got {chosen!r}")
    if chosen is None:
        if handle is not slide:
            handle.close()
        raise NoResolutionError(f"{name}: the slide has no resolution (no openslide.mpp-x property); pass slide_mpp= "
                         "(--slide-mpp on the command line) with its level-0 micrometres per pixel")
    return Slide(handle, name, float(chosen), None if handle is slide else name)
