"""Files of the mitosis job, each written atomically (pyfastscan.io.files):

    mitoses.csv      x,y,probability per mitosis (level-0 pixels), with a header
    mitoses.geojson  the same points as QuPath detection objects, probability a measurement
    hotspot.png      thumbnail with the 2 mm^2 circle counts as a colour layer, the hotspot
                     circle and 10 HPF rectangle drawn and their counts written
    report.json      counts, hotspots (level-0 px and mm), grade, thresholds, timings, versions
"""
import math
import os
from typing import Dict, Optional

import numpy as np

from ..io.asap import detections_to_annotations
from ..io.files import prepare_folder, write_json, write_text
from ..io.geojson import write_geojson
from ..ops.hotspot import hotspot_counts
from ..io.images import colour_map, write_png
from ..pipeline.outputs import run_report


def _window_report(st, mpp: float) -> dict:
    at = st.max_center_xy
    return {"window": st.window, "area_mm2": st.area_mm2, "max_count": st.max_count,
            "percentile": st.percentile, "percentile_count": st.percentile_count,
            "max_center_px": list(at) if at else None,
            "max_center_mm": [v * mpp / 1000 for v in at] if at else None,
            "positions": st.n_positions, "step_um": st.step_um}


def write_hotspot_png(path: str, res) -> str:
    """The thumbnail, the circle counts on a grid of thumbnail pixels in colour (scaled to
    the maximum), the hotspot windows outlined and labelled with their counts."""
    from PIL import Image, ImageDraw

    thumb, ds = res.thumbnail, res.thumbnail_downsample
    th, tw = thumb.shape[:2]
    out = thumb.astype(np.float32)
    if res.mitoses:
        xy = np.array([(d.x, d.y) for d in res.mitoses])
        cm = hotspot_counts(xy, slide_size=res.slide_size, mpp=res.slide_mpp, step_um=ds * res.slide_mpp).counts
        counts = cm.numpy()[:th, :tw].astype(np.float32)
        counts = np.pad(counts, ((0, th - counts.shape[0]), (0, tw - counts.shape[1])))
        level = counts / max(1.0, float(counts.max()))
        a = np.where(counts > 0, 0.3 + 0.5 * level, 0.0)[..., None]
        out = out * (1 - a) + colour_map(level).astype(np.float32) * a
    img = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for d in res.mitoses:
        x, y = d.x / ds, d.y / ds
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=(0, 0, 0))
    c = res.circle
    if c.max_center_xy:
        x, y = c.max_center_xy[0] / ds, c.max_center_xy[1] / ds
        r = math.sqrt(c.area_mm2 / math.pi) * 1000 / res.slide_mpp / ds
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 0, 0), width=2)
        draw.text((min(max(5, x - 60), tw - 230), min(max(18, y + r + 3), th - 14)),
                  f"{c.max_count} (2 mm2 circle; p95 {c.percentile_count:g})", fill=(255, 0, 0))
    q = res.rect
    if q.max_center_xy:
        x, y = q.max_center_xy[0] / ds, q.max_center_xy[1] / ds
        side = math.sqrt(q.area_mm2 / 12) * 1000 / res.slide_mpp / ds  # 4:3 -> width 4u, height 3u
        draw.rectangle([x - 2 * side, y - 1.5 * side, x + 2 * side, y + 1.5 * side], outline=(0, 0, 255), width=2)
        draw.text((min(max(5, x - 2 * side), tw - 90), min(max(32, y + 1.5 * side + 3), th - 28)),
                  f"{q.max_count} (10 HPF)", fill=(0, 0, 255))
    draw.text((5, 5), f"mitoses: {len(res.mitoses)}  grade {res.grade}", fill=(0, 0, 0))
    return write_png(path, img)


def save_mitoses(res, folder: str, command: Optional[str] = None) -> Dict[str, str]:
    prepare_folder(folder)
    paths = {}
    rows = "".join(f"{d.x:.1f},{d.y:.1f},{d.probability:.6f}\n" for d in res.mitoses)
    paths["mitoses_csv"] = write_text(os.path.join(folder, "mitoses.csv"), "x,y,probability\n" + rows)
    paths["mitoses_geojson"] = write_geojson(os.path.join(folder, "mitoses.geojson"),
                                             detections_to_annotations(res.mitoses, "Mitosis"))
    if res.thumbnail is not None:
        paths["hotspot"] = write_hotspot_png(os.path.join(folder, "hotspot.png"), res)
    report = {
        "n_mitoses": len(res.mitoses), "n_candidates": len(res.candidates),
        "grade": res.grade, "grade_from": "circle 95th percentile",
        "hotspot_circle": _window_report(res.circle, res.slide_mpp),
        "hotspot_rect_10hpf": _window_report(res.rect, res.slide_mpp),
        "thresholds": res.params, "counting_area_mm2": res.count_mask.area_mm2(res.slide_mpp),
        **run_report(res, command),
    }
    paths["report"] = write_json(os.path.join(folder, "report.json"), report, indent=2)
    return paths
