"""OpenSlide's reading interface over tifffile, for TIFFs OpenSlide cannot open (striped
images, unusual layouts) and for pyramids stored as SubIFDs (OME-TIFF), which OpenSlide
does not see. A region read decodes only the tiles or strips it touches, each once while
it stays in a bounded cache of decoded segments (neighbouring ROIs share their halo's
tiles)."""
import os
import re
import threading
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import SlideError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


SEGMENT_CACHE_BYTES = 96 << 20  # decoded tiles kept per open TIFF (a 256 px RGB tile is 192 KiB)


class SegmentCache:
    """Decoded segments by key, the least recently used dropped beyond ``capacity`` bytes.
    Thread-safe; a segment one thread is decoding is waited for by the others (or, with
    ``wait=False``, left for later), so each is decoded once while it stays cached. Cached arrays are read-only (they are shared)."""

    def __init__(self, capacity: int = SEGMENT_CACHE_BYTES):
        self.capacity = capacity
        self._items: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._busy: Dict[tuple, threading.Lock] = {}  # held by the thread decoding the key
        self._bytes = 0
        self._lock = threading.Lock()
        self.decoded = 0  # segments decoded (misses), for tests and benchmarks

    def get(self, key: tuple, decode: Callable[[], tuple], wait: bool = True) -> Optional[tuple]:
        """``decode()`` -> (array or None, anything): the cached value of ``key``, decoded once.
        ``wait=False``: None when another thread is decoding it (come back for it later)."""
        while True:
            with self._lock:
                hit = self._items.get(key)
                if hit is not None:
                    self._items.move_to_end(key)
                    return hit
                busy = self._busy.get(key)
                if busy is None:
                    mine = self._busy[key] = threading.Lock()  # a C lock: an Event is a Python Condition
                    mine.acquire()
                    break
            if not wait:
                return None
            with busy:  # another thread decodes it; then look again (it may have failed)
                pass
        try:
            value = decode()
            if value[0] is not None:
                value[0].flags.writeable = False
            size = 0 if value[0] is None else value[0].nbytes
            with self._lock:
                self.decoded += 1
                if size <= self.capacity:
                    self._items[key] = value
                    self._bytes += size
                    while self._bytes > self.capacity:
                        _, (old, _) = self._items.popitem(last=False)
                        self._bytes -= 0 if old is None else old.nbytes
            return value
        finally:
            with self._lock:
                self._busy.pop(key).release()


class TiffFileSlide:
    """``level_dimensions``, ``level_downsamples``, ``read_region`` and ``properties`` of
    a TIFF read with tifffile: the levels of its first image series (main-IFD or SubIFD
    pyramids), 8-bit greyscale, RGB or RGBA, tiled or striped, any codec tifffile decodes.

    Raises ValueError (with the reason) for a file it cannot use."""

    def __init__(self, path: str):
        import tifffile

        self.name = path
        self._tif = tifffile.TiffFile(path)
        try:
            series = self._tif.series[0]
            self._pages = [lv.keyframe for lv in series.levels]
            for p in self._pages:
                if p.dtype != np.uint8 or p.samplesperpixel not in (1, 3, 4) or p.imagedepth != 1:
                    raise ValueError(f"only 8-bit greyscale, RGB or RGBA 2-D images are supported, got "
                                     f"{p.samplesperpixel} x {p.dtype} samples")
            self._pages.sort(key=lambda p: -p.imagewidth)
            self.level_dimensions = [(p.imagewidth, p.imagelength) for p in self._pages]
            w0 = self.level_dimensions[0][0]
            self.level_downsamples = [w0 / w for w, _ in self.level_dimensions]
            self.properties = self._properties()
            size = self._tif.filehandle.size
            for p in self._pages:
                end = max((o + c for o, c in zip(p.dataoffsets, p.databytecounts)), default=0)
                if end > size:
                    raise ValueError(f"truncated: its image data runs to byte {end} but the file has {size} bytes")
        except BaseException:
            self._tif.close()
            raise
        # One lock for every seek-and-read on the file, tifffile's own (its delay-loaded tag
        # values seek under it), and each level's decoder built now: tifffile builds it on
        # first use, reading tags from the file, and a reader thread seeking beside that read
        # got another segment's bytes (1 in 300 four-thread first reads, "Not a JPEG file").
        self._tif.filehandle.set_lock(True)
        self._lock = self._tif.filehandle.lock
        # Where the OS has pread, segments are read through a descriptor of their own, at an
        # offset and with no lock: a read neither moves tifffile's file position nor waits for
        # another reader's (the lock and seek took 11% of two reader threads' samples).
        # (A forked child, a DataLoader worker, shares the descriptor safely: pread has no offset.)
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)) if hasattr(os, "pread") else None
        except OSError:
            self._tif.close()
            raise
        for p in self._pages:
            p.init_decode() if hasattr(p, "init_decode") else p.decode
        self._cache = SegmentCache()

    def _properties(self) -> Dict[str, str]:
        page = self._pages[0]
        props = {"tifffile.series": self._tif.series[0].kind}
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "")
            if den:
                props.update({"tiff.XResolution": str(num / den), "tiff.ResolutionUnit": unit})
        desc = page.description or ""
        m = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc)  # Aperio
        if m:
            props["aperio.MPP"] = m.group(1)
        ome = self._tif.ome_metadata or ""
        m = re.search(r'PhysicalSizeX="([^"]+)"', ome)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
        if m and (unit is None or unit.group(1) in ("\u00b5m", "um")):  # OME's default unit is um
            props["openslide.mpp-x"] = m.group(1)
        return props

    def _segments(self, page, y0: int, y1: int, x0: int, x1: int) -> List[int]:
        """Indices (into the page's offsets) of the tiles or strips meeting rows [y0, y1)
        and columns [x0, x1), over every separate sample plane."""
        planes = page.samplesperpixel if page.planarconfig == 2 else 1
        if page.is_tiled:
            tw, tl = page.tilewidth, page.tilelength
            nx, ny = -(-page.imagewidth // tw), -(-page.imagelength // tl)
            per_plane = nx * ny
            idx = [ty * nx + tx for ty in range(y0 // tl, (y1 - 1) // tl + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
        else:
            rps = min(page.rowsperstrip or page.imagelength, page.imagelength)
            per_plane = -(-page.imagelength // rps)
            idx = list(range(y0 // rps, (y1 - 1) // rps + 1))
        return [p * per_plane + i for p in range(planes) for i in idx]

    def read_region(self, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> np.ndarray:
        """RGBA uint8 (h, w, 4) like OpenSlide: ``location`` in level-0 pixels, ``size`` in
        pixels of ``level``; outside the image is transparent (alpha 0)."""
        ds = self.level_downsamples[level]
        return self.read_level(level, int(location[0] // ds), int(location[1] // ds), int(size[0]), int(size[1]))

    def read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """RGBA uint8 (h, w, 4): the pixels [lx, lx + w) x [ly, ly + h) of ``level`` in its
        own coordinates, exactly as stored (OpenSlide resamples a level whose downsample is
        not an integer when the level-0 location falls between its pixels)."""
        page = self._pages[level]
        out = np.zeros((h, w, 4), dtype=np.uint8)
        spp = page.samplesperpixel
        for ya, yb, xa, xb, block, plane in self._pieces(level, lx, ly, w, h):
            dst = out[ya - ly:yb - ly, xa - lx:xb - lx]
            if page.planarconfig == 2 and spp > 1:
                dst[..., plane if plane < 3 else 3] = block[..., 0]
            elif spp == 1:
                dst[..., :3] = block[..., :1]
            else:
                dst[..., :spp] = block[..., :spp]
            if spp != 4:
                dst[..., 3] = 255
        return out

    def read_level_rgb(self, level: int, lx: int, ly: int, w: int, h: int):
        """RGB uint8 (h, w, 3) of the same pixels, or None when they are not all opaque
        stored RGB (the region leaves the image, a tile is missing, the level is not
        3-sample contiguous): then :meth:`read_level` says where. The fast path of a scan's
        reads: one copy per tile, no alpha."""
        page = self._pages[level]
        if page.samplesperpixel != 3 or (page.planarconfig == 2) or lx < 0 or ly < 0 or \
                lx + w > page.imagewidth or ly + h > page.imagelength:
            return None
        out = np.empty((h, w, 3), dtype=np.uint8)
        covered = 0
        for ya, yb, xa, xb, block, _ in self._pieces(level, lx, ly, w, h):
            out[ya - ly:yb - ly, xa - lx:xb - lx] = block
            covered += (yb - ya) * (xb - xa)
        return out if covered == w * h else None  # segments do not overlap: area counts coverage

    def _pieces(self, level: int, lx: int, ly: int, w: int, h: int):
        """(ya, yb, xa, xb, block, plane) for each decoded segment meeting the region:
        ``block`` holds its level pixels [xa, xb) x [ya, yb)."""
        page = self._pages[level]
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, page.imagewidth), min(ly + h, page.imagelength)
        if x1 <= x0 or y1 <= y0:
            return
        fh = self._tif.filehandle

        def decode(i):
            offset, count = page.dataoffsets[i], page.databytecounts[i]
            if not count:
                data = None
            elif self._fd is not None:
                data = os.pread(self._fd, count, offset)
            else:
                with self._lock:
                    fh.seek(offset)
                    data = fh.read(count)
            if data is not None and len(data) != count:
                raise SlideError(f"{self.name}: segment {i} of level {level} ends beyond the end of the file "
                                 "(was it truncated since it was opened?)")
            try:
                seg, (plane, _, sy, sx, _), _ = page.decode(data, i, jpegtables=page.jpegtables)
            except Exception as exc:  # codecs raise many types
                raise SlideError(f"{self.name}: segment {i} of level {level} cannot be decoded (corrupt file?): "
                                 f"{type(exc).__name__}: {exc}") from None
            return (None if seg is None else seg[0]), (plane, sy, sx)  # (length, width, contig samples)

        def piece(got):
            seg, (plane, sy, sx) = got
            if seg is None:
                return None
            ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
            xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
            return (ya, yb, xa, xb, seg[ya - sy:yb - sy, xa - sx:xb - sx], plane) if ya < yb and xa < xb else None

        later = []  # segments another thread is decoding: taken after the others, not waited for first
        for i in self._segments(page, y0, y1, x0, x1):
            got = self._cache.get((level, i), lambda: decode(i), wait=False)
            if got is None:
                later.append(i)
                continue
            p = piece(got)
            if p is not None:
                yield p
        for i in later:
            p = piece(self._cache.get((level, i), lambda: decode(i)))
            if p is not None:
                yield p

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()
