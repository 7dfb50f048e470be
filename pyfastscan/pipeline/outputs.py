"""Files of a scan, each written atomically (a temporary file in the same folder, then
os.replace), so an interrupted run never leaves a half-written output behind.

    heatmap.tif         pyramidal tiled TIFF, uint8 probability * 255 (or float32), every level a page
                        of the main IFD chain (OpenSlide does not see SubIFDs), resolution
                        in the tags: opens in OpenSlide, QuPath and ASAP
    overlay.png         thumbnail with the map in colour and the tissue outline
    detections.csv      Camelyon16 submission format: probability,x,y (level 0), no header
    detections.geojson  the same points as a FeatureCollection (QuPath imports it)
    detections.xml      the same points as ASAP XML dots
    heatmap_contours.xml  outlines of the map above the detection threshold, ASAP XML
                        polygons (holes in group "_2"), level-0 pixels
    report.json         score, geometry, ROI counts, tissue area, timings, versions, command
"""
import os
import platform
import sys
from typing import Dict, Optional

import numpy as np

from ..io.files import atomic_write
from ..errors import InvalidArgumentError
from ..io.annotations import contours
from ..io.asap import detections_to_annotations, write_asap_xml
from ..io.files import prepare_folder, write_json, write_text
from ..io.geojson import write_geojson


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 box downsample of an image (H, W) or (H, W, C): uint8 rounding half up, float
    averaged in its dtype; an axis of length 1 stays 1."""
    floating = np.issubdtype(a.dtype, np.floating)
    b = a.astype(a.dtype if floating else np.uint16)
    for axis in (0, 1):
        n = b.shape[axis]
        if n < 2:
            b = b * 2
            continue
        even = n // 2 * 2
        b = np.take(b, range(0, even, 2), axis) + np.take(b, range(1, even, 2), axis)
    return (b / 4).astype(a.dtype) if floating else ((b + 2) // 4).astype(np.uint8)


def write_pyramid_tif(path: str, image: np.ndarray, mpp: float, *, levels: Optional[int] = None,
                      compression: str = "zlib", description: Optional[str] = None) -> str:
    """Tiled (256 px) pyramidal TIFF, each level a page of the main IFD chain (where
    OpenSlide looks), with the resolution of each level in its tags. ``image`` is uint8
    or float32
    (H, W) or RGB (H, W, 3) at ``mpp`` um/px. Without ``levels``, halves until the level
    fits one tile."""
    import tifffile

    pyramid = [image]
    while (len(pyramid) < levels) if levels is not None else max(pyramid[-1].shape[:2]) > 256:
        pyramid.append(_halve(pyramid[-1]))
    photometric = "rgb" if image.ndim == 3 else "minisblack"

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for i, lv in enumerate(pyramid):
                res = 1e4 / (mpp * 2 ** i)  # pixels per centimetre
                tif.write(lv, tile=(256, 256), compression=compression, photometric=photometric,
                          resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
                          description=description if i == 0 else None, metadata=None)

    return atomic_write(path, write)


def write_heatmap_tif(path: str, heat: np.ndarray, mpp_map: float, dtype: str = "uint8") -> str:
    """The probability map, zlib tiles, pyramid to one tile: ``uint8`` (probability * 255;
    OpenSlide, QuPath and ASAP open it) or ``float32`` (the probabilities themselves; QuPath
    and tifffile read it, OpenSlide reads 8-bit images only)."""
    if dtype == "float32":
        return write_pyramid_tif(path, np.ascontiguousarray(heat, dtype=np.float32), mpp_map,
                                 description="pyfastscan heat map: probability (float32)")
    if dtype != "uint8":
        raise InvalidArgumentError(f"heat map dtype must be 'uint8' or 'float32', got {dtype!r}")
    scaled = np.empty(heat.shape, dtype=np.uint8)
    for r in range(0, heat.shape[0], 1024):  # in bands: no full-size float temporaries
        scaled[r:r + 1024] = np.clip(np.rint(heat[r:r + 1024] * 255), 0, 255)
    return write_pyramid_tif(path, scaled, mpp_map, description="pyfastscan heat map: probability * 255")


def colour_map(heat: np.ndarray) -> np.ndarray:
    """A blue-to-red colour map (0 blue, 0.5 yellow-green, 1 red), uint8 RGB."""
    h = np.clip(heat, 0, 1)[..., None]
    stops = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)
    pos = h * 3
    i = np.minimum(pos.astype(int), 2)
    f = pos - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)


def write_overlay_png(path: str, result) -> str:
    from PIL import Image
    from scipy import ndimage

    thumb = result.thumbnail
    ds = result.thumbnail_downsample
    th, tw = thumb.shape[:2]
    ys = ((np.arange(th) + 0.5) * ds - result.origin_px[1]) / result.stride_px
    xs = ((np.arange(tw) + 0.5) * ds - result.origin_px[0]) / result.stride_px
    iy, ix = np.rint(ys).astype(int), np.rint(xs).astype(int)
    inside = ((iy >= 0) & (iy < result.heatmap.shape[0]))[:, None] & ((ix >= 0) & (ix < result.heatmap.shape[1]))
    heat = result.heatmap[np.clip(iy, 0, result.heatmap.shape[0] - 1)[:, None],
                          np.clip(ix, 0, result.heatmap.shape[1] - 1)[None, :]]
    alpha = np.where(inside, 0.25 + 0.5 * heat, 0.0).astype(np.float32)[..., None]
    out = (thumb * (1 - alpha) + colour_map(heat) * alpha).astype(np.uint8)
    m = result.tissue.on_grid((np.arange(th) + 0.5) * ds, (np.arange(tw) + 0.5) * ds)
    out[m & ~ndimage.binary_erosion(m)] = (0, 160, 0)  # tissue outline in green
    return atomic_write(path, lambda tmp: Image.fromarray(out).save(tmp, format="PNG"))


def package_versions() -> Dict[str, str]:
    import torch

    from .. import __version__

    return {"pyfastscan": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def run_report(result, command: Optional[str] = None) -> dict:
    """The report.json entries every slide job shares (the :class:`SlideRun` fields)."""
    return {
        "slide": result.slide_name, "slide_size_px": list(result.slide_size), "slide_mpp": result.slide_mpp,
        "model_geometry": result.geometry, "model": result.model, "rois_scanned": result.n_rois, "rois_total": result.n_rois_total,
        "cells": result.cells,
        "tissue_area_mm2": result.tissue.area_mm2(result.slide_mpp), "tissue_mask_downsample": result.tissue.downsample,
        "timings_s": result.timings, "versions": package_versions(),
        "command": command if command is not None else " ".join(sys.argv),
    }


def save_result(result, folder: str, command: Optional[str] = None, heatmap_dtype: str = "uint8",
                extra: Optional[dict] = None) -> Dict[str, str]:
    prepare_folder(folder)
    paths = {}
    paths["heatmap"] = write_heatmap_tif(os.path.join(folder, "heatmap.tif"), result.heatmap,
                                         result.stride_px * result.slide_mpp, heatmap_dtype)
    if result.thumbnail is not None:
        paths["overlay"] = write_overlay_png(os.path.join(folder, "overlay.png"), result)
    dets = result.detections

    paths["detections_csv"] = write_text(os.path.join(folder, "detections.csv"),
                                         "".join(f"{d.probability:.6f},{d.x:.1f},{d.y:.1f}\n" for d in dets))
    points = detections_to_annotations(dets, "Tumor")
    paths["detections_geojson"] = write_geojson(os.path.join(folder, "detections.geojson"), points)
    paths["detections_xml"] = write_asap_xml(os.path.join(folder, "detections.xml"), points)
    outline = contours(result.heatmap > result.threshold, result.stride_px, result.origin_px, group="Tumor")
    paths["contours_xml"] = write_asap_xml(os.path.join(folder, "heatmap_contours.xml"), outline)

    report = {
        "score": result.score, "n_detections": len(dets), "scan_mpp": result.scan_mpp,
        "heatmap": {"shape": list(result.heatmap.shape), "stride_px": result.stride_px,
                    "origin_px": list(result.origin_px),
                    "note": "cell (i, j) is the patch centred at origin + (j, i) * stride, level-0 pixels"},
        "rois_resumed": result.n_rois_resumed, **run_report(result, command), **(extra or {}),
    }
    paths["report"] = write_json(os.path.join(folder, "report.json"), report, indent=2)
    return paths
