"""OpenSlide's reading interface over tifffile, for TIFFs OpenSlide cannot open (striped
images, unusual layouts) and for pyramids stored as SubIFDs (OME-TIFF), which OpenSlide
does not see. A region read decodes only the tiles or strips it touches."""
import re
import threading
from typing import Dict, List, Tuple

import numpy as np

from ..errors import SlideError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


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
        self._lock = threading.Lock()

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
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, page.imagewidth), min(ly + h, page.imagelength)
        if x1 <= x0 or y1 <= y0:
            return out
        fh = self._tif.filehandle
        spp = page.samplesperpixel
        for i in self._segments(page, y0, y1, x0, x1):
            offset, count = page.dataoffsets[i], page.databytecounts[i]
            with self._lock:
                fh.seek(offset)
                data = fh.read(count) if count else None
            try:
                seg, (plane, _, sy, sx, _), _ = page.decode(data, i, jpegtables=page.jpegtables)
            except Exception as exc:  # codecs raise many types
                raise SlideError(f"{self.name}: segment {i} of level {level} cannot be decoded (corrupt file?): "
                                 f"{type(exc).__name__}: {exc}") from None
            if seg is None:
                continue
            seg = seg[0]  # (length, width, contig samples)
            ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
            xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
            if ya >= yb or xa >= xb:
                continue
            block = seg[ya - sy:yb - sy, xa - sx:xb - sx]
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

    def close(self) -> None:
        self._tif.close()
