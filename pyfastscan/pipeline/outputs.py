"""Files of a scan, each written atomically (a temporary file in the same folder, then
os.replace), so an interrupted run never leaves a half-written output behind. README
"Output files" has the table of every file and its columns.

    heatmap.tif         pyramidal tiled TIFF on the slide's own grid (see viewer_grid): pixel
                        (i, j) covers level-0 [j*D, (j+1)*D) x [i*D, (i+1)*D), D an integer
                        number of level-0 px; uint8 probability * 255 (or float32); every level
                        a page of the main IFD chain (OpenSlide does not see SubIFDs), D * mpp
                        in the resolution tags: QuPath and ASAP overlay it on the slide as is
    overlay.png         thumbnail, the map in colour where it is high, colour bar, scale bar,
                        detections, the tissue outline and (``truth``) the ground truth
    detections.csv      x,y,probability (level-0 px) with a header, the package's CSV convention
    camelyon16_submission.csv  probability,x,y, no header, integer level-0 coordinates: the
                        layout the Camelyon16 evaluation script reads
    detections.geojson  the same points as QuPath detection objects, probability a measurement
    detections.xml      the same points as ASAP XML dots
    heatmap_contours.geojson  outlines of the map above the detection threshold, one polygon
                        with holes per region, QuPath annotations ("max probability" measurement)
    heatmap_contours.xml  the same outlines as ASAP XML polygons (holes in group "_2")
    report.json         score, geometry (of the map and of heatmap.tif), ROI counts, tissue
                        area, timings, versions, command
"""
import math
import os
import platform
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidArgumentError
from ..io.annotations import contour_polygons, holes_as_exclusions, rasterize
from ..io.asap import detections_to_annotations, write_asap_xml
from ..io.files import prepare_folder, write_json, write_text
from ..io.geojson import write_geojson
from ..io.images import colour_map, draw_colour_bar, draw_scale_bar, font, text_size, write_png, write_pyramid_tif


def whole_step(stride_px: float) -> bool:
    """Is the map step a whole number of level-0 pixels (to 1e-9 relative)?"""
    return abs(stride_px - round(stride_px)) <= 1e-9 * stride_px


def viewer_grid(stride_px: float, origin_px: Tuple[float, float], slide_size: Tuple[int, int]):
    """Where the map's cells go on a grid aligned with the slide (DESIGN.md 6.4).

    The map's cell (r, c) is the patch centred at origin + (c, r) * stride (level-0 px).
    The viewer grid has pixels of D level-0 px, D = the stride if it is a whole number,
    else the stride rounded (>= 1); its pixel (i, j) covers x in [j*D, (j+1)*D), y in
    [i*D, (i+1)*D) and holds the cell whose patch centre is nearest the pixel's centre
    ((j + 0.5) * D, (i + 0.5) * D) (a tie goes to the higher cell), 0 where no cell is
    that near (the half patch along the slide's edges). Its size is floor(W / D) x floor(H / D):
    whole pixels only, so that ASAP's integer scale W // width is D.

    Returns (D, rows, cols, offset): the cell row of every grid row and the cell column of
    every grid column (outside the map's range: none), and the level-0 offset of the held cell's patch centre
    from the pixel's centre, (dx, dy): constant when D is the stride (at most D / 2), else
    the largest |offset| over the grid in both entries.
    """
    d = float(max(1, round(stride_px)))
    w, h = slide_size
    nw, nh = max(1, int(w // d)), max(1, int(h // d))

    def axis(n, o):
        centre = (np.arange(n) + 0.5) * d
        return np.floor((centre - o) / stride_px + 0.5).astype(np.int64), centre

    cols, cx = axis(nw, origin_px[0])
    rows, cy = axis(nh, origin_px[1])
    offset = []
    for idx, centre, o in ((cols, cx, origin_px[0]), (rows, cy, origin_px[1])):
        off = o + idx * stride_px - centre
        offset.append(float(off[0]) if whole_step(stride_px) else float(np.abs(off).max()))
    return d, rows, cols, tuple(offset)


def place_on_grid(heat: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype: str = "uint8") -> np.ndarray:
    """The viewer-grid image of ``heat`` (see viewer_grid): uint8 probability * 255 rounded
    or float32 probabilities, 0 where rows / cols are out of the map. Built in bands of
    256 rows: no full-size float temporaries for uint8 (bands of 1024 rows of a 10k-wide
    map took 157 MB of them)."""
    if dtype not in ("uint8", "float32"):
        raise InvalidArgumentError(f"heat map dtype must be 'uint8' or 'float32', got {dtype!r}")
    out = np.zeros((len(rows), len(cols)), dtype=np.uint8 if dtype == "uint8" else np.float32)
    vc = np.nonzero((cols >= 0) & (cols < heat.shape[1]))[0]
    vr = np.nonzero((rows >= 0) & (rows < heat.shape[0]))[0]
    for b in range(0, len(vr), 256):
        band = vr[b:b + 256]
        block = heat[rows[band]][:, cols[vc]]
        if dtype == "uint8":
            block = np.clip(np.rint(block * 255), 0, 255)
        out[band[:, None], vc[None, :]] = block
    return out


def write_heatmap_tif(path: str, heat: np.ndarray, mpp_px: float) -> str:
    """An image (already on its grid) as heatmap.tif, zlib tiles, pyramid to one tile, at
    ``mpp_px`` um/px: ``uint8`` (OpenSlide, QuPath and ASAP open it) or ``float32`` (QuPath
    and tifffile read it, OpenSlide reads 8-bit images only)."""
    what = "probability * 255" if heat.dtype == np.uint8 else "probability (float32)"
    return write_pyramid_tif(path, heat, mpp_px, description=f"pyfastscan heat map: {what}")


OVERLAY_FLOOR = 0.2  # overlay.png leaves the slide uncoloured where the probability is below this
TRUTH_COLOUR, DETECTION_COLOUR, TISSUE_COLOUR = (0, 170, 0), (0, 0, 0), (140, 140, 140)


def _sample_map(result, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The map at level-0 points ys x xs: the cell whose patch centre is nearest, 0 outside."""
    iy = np.rint((ys - result.origin_px[1]) / result.stride_px).astype(int)
    ix = np.rint((xs - result.origin_px[0]) / result.stride_px).astype(int)
    n_r, n_c = result.heatmap.shape
    inside = ((iy >= 0) & (iy < n_r))[:, None] & ((ix >= 0) & (ix < n_c))[None, :]
    heat = result.heatmap[np.clip(iy, 0, n_r - 1)[:, None], np.clip(ix, 0, n_c - 1)[None, :]]
    return np.where(inside, heat, 0.0)


def _inside(mask: np.ndarray, x: float, y: float) -> bool:
    """mask at thumbnail point (x, y), clamped to the mask."""
    return bool(mask[min(mask.shape[0] - 1, max(0, int(y))), min(mask.shape[1] - 1, max(0, int(x)))])


def write_overlay_png(path: str, result, truth: Optional[Sequence] = None, floor: float = OVERLAY_FLOOR) -> str:
    """The slide thumbnail with the map in colour where it is at least ``floor`` (the glass
    and low-probability tissue stay as they are), the tissue outline (grey), the ground
    truth ``truth`` (annotations in level-0 px: polygons outlined, points as squares, green),
    detections as rings (filled when inside a truth polygon), and a legend strip below: the
    colour bar with its scale, a scale bar in mm, what each mark means."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    thumb, ds = result.thumbnail, result.thumbnail_downsample
    th, tw = thumb.shape[:2]
    ys, xs = (np.arange(th) + 0.5) * ds, (np.arange(tw) + 0.5) * ds
    heat = _sample_map(result, ys, xs)
    alpha = np.where(heat >= floor, 0.6, 0.0).astype(np.float32)[..., None]
    out = (thumb * (1 - alpha) + colour_map(heat) * alpha).astype(np.uint8)
    m = result.tissue.on_grid(ys, xs)
    out[m & ~ndimage.binary_erosion(m)] = TISSUE_COLOUR
    truth = list(truth or [])
    polys = [a for a in truth if a.kind == "polygon"]
    inside_truth = rasterize(polys, (th, tw), ds) if polys else None
    hit = [inside_truth is not None and _inside(inside_truth, d.x / ds, d.y / ds) for d in result.detections]

    fnt = font(12)
    n = len(result.detections)
    items = [("ring", f"detection (p > {result.threshold:g}): {n}")]
    if polys:
        items += [("dot", f"detection inside the truth: {sum(hit)} of {n}")]
    if truth:
        items += [("truth", "ground truth")]
    items += [("tissue", "tissue outline")]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = text_size(probe, "Ag", fnt)[1] + 8
    items_w = 16 + max(text_size(probe, t, fnt)[0] for _, t in items)
    left_w = 390  # colour bar (10..210) and scale bar (240..390)
    width = max(tw, left_w + items_w + 20)
    legend_h = max(80, 20 + line_h * len(items))
    img = Image.new("RGB", (width, th + legend_h), (255, 255, 255))
    img.paste(Image.fromarray(out), (0, 0))
    draw = ImageDraw.Draw(img)
    for a in polys:
        for ring in [a.coords, *a.holes]:
            pts = [(float(x) / ds, float(y) / ds) for x, y in ring]
            draw.line(pts + pts[:1], fill=TRUTH_COLOUR, width=2)
    for a in truth:
        if a.kind == "points":
            for x, y in a.coords:
                draw.rectangle([x / ds - 3, y / ds - 3, x / ds + 3, y / ds + 3], outline=TRUTH_COLOUR, width=2)
    for d, inside in zip(result.detections, hit):
        x, y = d.x / ds, d.y / ds
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(255, 255, 255), width=3)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=DETECTION_COLOUR, width=1,
                     fill=DETECTION_COLOUR if inside else None)

    top = th + 30
    draw_colour_bar(draw, (10, top, 210, top + 14), (0, floor, 0.5, 1), f"probability (no colour below {floor:g})",
                    transparent_below=floor, fnt=fnt)
    draw_scale_bar(draw, (240, top + 2), 1000 / (result.slide_mpp * ds), 150, fnt=fnt)
    x, y = width - items_w - 10, th + 10
    for kind, text in items:
        cy = y + line_h // 2 - 3
        if kind in ("ring", "dot"):
            draw.ellipse([x, cy - 5, x + 10, cy + 5], outline=DETECTION_COLOUR,
                         fill=DETECTION_COLOUR if kind == "dot" else None)
        else:
            draw.line([(x - 1, cy), (x + 11, cy)], fill=TRUTH_COLOUR if kind == "truth" else TISSUE_COLOUR,
                      width=2 if kind == "truth" else 1)
        draw.text((x + 16, y), text, fill=(0, 0, 0), font=fnt)
        y += line_h
    return write_png(path, img)


def package_versions() -> Dict[str, str]:
    import torch

    from .._version import __version__

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
                truth: Optional[Sequence] = None, extra: Optional[dict] = None) -> Dict[str, str]:
    prepare_folder(folder)
    paths = {}
    d, rows, cols, offset = viewer_grid(result.stride_px, result.origin_px, result.slide_size)
    grid = place_on_grid(result.heatmap, rows, cols, heatmap_dtype)
    paths["heatmap"] = write_heatmap_tif(os.path.join(folder, "heatmap.tif"), grid, d * result.slide_mpp)
    del grid
    if result.thumbnail is not None:
        paths["overlay"] = write_overlay_png(os.path.join(folder, "overlay.png"), result, truth)
    dets = result.detections
    paths["detections_csv"] = write_text(os.path.join(folder, "detections.csv"), "x,y,probability\n" + "".join(
        f"{p.x:.1f},{p.y:.1f},{p.probability:.6f}\n" for p in dets))
    paths["camelyon16_csv"] = write_text(os.path.join(folder, "camelyon16_submission.csv"), "".join(
        f"{p.probability:.6f},{int(math.floor(p.x + 0.5))},{int(math.floor(p.y + 0.5))}\n" for p in dets))
    points = detections_to_annotations(dets, "Tumor")
    paths["detections_geojson"] = write_geojson(os.path.join(folder, "detections.geojson"), points)
    paths["detections_xml"] = write_asap_xml(os.path.join(folder, "detections.xml"), points)
    outline = contour_polygons(result.heatmap > result.threshold, result.stride_px, result.origin_px, group="Tumor",
                               values=result.heatmap)
    paths["contours_geojson"] = write_geojson(os.path.join(folder, "heatmap_contours.geojson"), outline)
    paths["contours_xml"] = write_asap_xml(os.path.join(folder, "heatmap_contours.xml"),
                                           holes_as_exclusions(outline, "_2"))
    report = {
        "score": result.score, "n_detections": len(dets), "scan_mpp": result.scan_mpp,
        "heatmap": {"file": "heatmap.tif", "shape": [len(rows), len(cols)], "pixel_px": d,
                    "pixel_um": d * result.slide_mpp, "dtype": heatmap_dtype,
                    "values": "probability * 255" if heatmap_dtype == "uint8" else "probability",
                    "cell_offset_px": list(offset), "exact": whole_step(result.stride_px),
                    "note": "heatmap.tif pixel (i, j) covers level-0 x in [j * pixel_px, (j + 1) * pixel_px), y in "
                            "[i * pixel_px, (i + 1) * pixel_px) and holds the map cell whose patch centre is nearest "
                            "that square's centre; cell_offset_px = that patch centre minus the square's centre "
                            "(the largest |offset| when not exact)"},
        "map": {"shape": list(result.heatmap.shape), "stride_px": result.stride_px,
                "origin_px": list(result.origin_px),
                "note": "map cell (i, j) is the patch centred at origin + (j, i) * stride, level-0 pixels; "
                        "detections and contours are on this grid"},
        "rois_resumed": result.n_rois_resumed, **run_report(result, command), **(extra or {}),
    }
    paths["report"] = write_json(os.path.join(folder, "report.json"), report, indent=2)
    return paths
