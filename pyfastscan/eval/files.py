"""Reading predictions and ground truth for the evaluations, in the formats the scan and
mitosis jobs write and the challenges distribute.

Predictions of a slide ``NAME`` in a folder: ``NAME.csv`` (Camelyon16 submission:
``probability,x,y`` per line, no header) or a scan's output folder ``NAME/`` holding
``detections.csv`` (``x,y,probability`` with a header; until this release it was headerless
``probability,x,y``, still read) or ``camelyon16_submission.csv``; its ``report.json``
also gives the slide score and size.

Point files: CSV with a header naming ``x``, ``y`` and optionally ``probability`` (or
``prob``, ``score``) columns; a headerless 3-column CSV is ``probability,x,y`` (Camelyon16)
and a 2-column one ``x,y``; GeoJSON points (probability from the QuPath measurement
``probability``, else the ``probability`` property); ASAP XML dots; a SlideRunner database
(with the slide and class to read).
"""
import csv
import json
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..io import AnnotationError, read_asap_xml, read_geojson, read_sliderunner_points
from ..io._safe import parse_number, read_bounded
from ..io.files import COHORT_CSV, read_status

_PROB = ("probability", "prob", "score", "confidence")


def read_points_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """((N, 2) x, y; (N,) probability) from a CSV file (see the module docstring)."""
    text = read_bounded(path).decode("utf-8", errors="replace")
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        return np.zeros((0, 2)), np.zeros(0)
    head = [c.strip().lower() for c in rows[0]]
    try:
        [float(c) for c in head]
        header = None
    except ValueError:
        header = head
        rows = rows[1:]
    if header is not None:
        if "x" not in header or "y" not in header:
            raise AnnotationError(f"{path}: line 1: a header must name x and y columns, got {rows and head}")
        ix, iy = header.index("x"), header.index("y")
        ip = next((header.index(n) for n in _PROB if n in header), None)
    else:
        width = len(head)
        if width not in (2, 3):
            raise AnnotationError(f"{path}: line 1: {width} columns; expected probability,x,y or x,y")
        ip, ix, iy = (0, 1, 2) if width == 3 else (None, 0, 1)
    xy, prob = [], []
    first = 2 if header is not None else 1
    for k, r in enumerate(rows):
        where = f"{path}: line {first + k}"
        need = max(i for i in (ix, iy, ip) if i is not None)
        if len(r) <= need:
            raise AnnotationError(f"{where}: {len(r)} columns, expected at least {need + 1}")
        xy.append((parse_number(r[ix], where, "x"), parse_number(r[iy], where, "y")))
        prob.append(parse_number(r[ip], where, "probability") if ip is not None else 1.0)
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2), np.asarray(prob, dtype=np.float64)


def read_points(path: str, slide: Optional[str] = None, cls: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Points and probabilities from CSV, GeoJSON, ASAP XML or SlideRunner SQLite (by
    extension; the database needs ``slide``, and ``cls`` defaults to "Mitotic figure")."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".geojson", ".json"):
        anns = read_geojson(path)
    elif ext == ".xml":
        anns = read_asap_xml(path)
    elif ext in (".sqlite", ".db", ".sqlite3"):
        if slide is None:
            raise AnnotationError(f"{path}: a SlideRunner database needs the slide to read (--slide)")
        pts = read_sliderunner_points(path, slide, cls or "Mitotic figure")
        return pts, np.ones(len(pts))
    else:
        return read_points_csv(path)
    xy, prob = [], []
    for a in anns:
        if a.kind != "points":
            continue
        m = a.properties.get("measurements")
        p = m.get("probability") if isinstance(m, dict) else None  # QuPath 0.4+ measurements
        if p is None and isinstance(m, list):  # QuPath before 0.4: [{"name": ..., "value": ...}]
            p = next((e.get("value") for e in m if isinstance(e, dict) and e.get("name") == "probability"), None)
        if p is None:
            p = a.properties.get("probability")
        if p is None:
            p = 1.0  # points without a probability all count
        elif isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise AnnotationError(f"{path}: point {a.coords[0] if len(a.coords) else ''} has probability {p!r}, "
                                  "not a finite number (a JSON number, not a string)")
        for x, y in a.coords:
            xy.append((x, y))
            prob.append(float(p))
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2), np.asarray(prob, dtype=np.float64)


def prediction_files(folder: str) -> Dict[str, str]:
    """Slide name -> its detections CSV in ``folder``: NAME.csv, or NAME/detections.csv
    (else NAME/camelyon16_submission.csv) at any depth (a cohort's OUT/<relative path>/NAME/,
    see pyfastscan.cohort); the cohort's own cohort.csv is not a slide's. Two slides of the
    same name are refused, and so is a slide folder whose status is not "done" (a failed or
    interrupted scan leaves an earlier run's or a half-written CSV)."""
    if not os.path.isdir(folder):
        raise AnnotationError(f"{folder}: no such folder")
    out = {}

    def add(name, path):
        if name in out:
            raise AnnotationError(f"{folder}: two predictions for slide {name!r} ({out[name]} and {path}); evaluate "
                                  "their folders separately")
        out[name] = path

    for entry in sorted(os.listdir(folder)):
        p = os.path.join(folder, entry)
        if entry.lower().endswith(".csv") and os.path.isfile(p) and entry != COHORT_CSV:
            add(entry[:-4], p)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found = next((n for n in SCAN_CSVS if n in files), None)
        if root != folder and found:
            state = (read_status(root) or {}).get("state", "done")  # folders older than status.json: as they are
            if state != "done":
                raise AnnotationError(f"{root}: the slide's folder is marked {state!r}: its {found} is left over "
                                      "from an earlier run or half written; run the scan again (the same command "
                                      "resumes it) or evaluate without this folder")
            add(os.path.basename(root), os.path.join(root, found))
    return out


SCAN_CSVS = ("detections.csv", "camelyon16_submission.csv")  # what a scan's folder holds, in preference


def scan_report(detections_csv: str) -> Optional[dict]:
    """The report.json beside a scan's detections CSV, if there is one."""
    p = os.path.join(os.path.dirname(detections_csv), "report.json")
    if os.path.basename(detections_csv) not in SCAN_CSVS or not os.path.isfile(p):
        return None
    try:
        return json.loads(read_bounded(p, 16 << 20))
    except ValueError as exc:
        raise AnnotationError(f"{p}: not valid JSON ({exc})") from None


def read_labels(path: str) -> Dict[str, int]:
    """Slide name -> 1 (tumour) / 0 (normal) from a CSV whose first two columns are the
    name and the label (Tumor/Normal, tumor/normal, 1/0), with or without a header."""
    text = read_bounded(path).decode("utf-8", errors="replace")
    out = {}
    for k, r in enumerate(csv.reader(text.splitlines())):
        if not r or not r[0].strip():
            continue
        if len(r) < 2:
            raise AnnotationError(f"{path}: line {k + 1}: expected name,label")
        name, label = os.path.splitext(r[0].strip())[0], r[1].strip().lower()
        if label in ("tumor", "tumour", "1"):
            out[name] = 1
        elif label in ("normal", "0"):
            out[name] = 0
        elif k == 0:
            continue  # a header
        else:
            raise AnnotationError(f"{path}: line {k + 1}: label {r[1]!r} is not Tumor/Normal/1/0")
    return out
