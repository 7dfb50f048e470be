"""GeoJSON annotations as QuPath reads and writes them: a FeatureCollection (or a list of
Features, or one Feature) of Point, MultiPoint, Polygon and MultiPolygon geometries in
level-0 pixels; the group is ``properties.classification.name``.

Reading is bounded in size, refuses NaN and Infinity, and names the file and where it
broke (line and column for JSON syntax, the feature index for a wrong structure).
"""
import json
import os
from typing import List, Optional, Sequence

import numpy as np

from ._safe import MAX_BYTES, AnnotationError, read_bounded
from .annotations import Annotation
from .files import write_json


def _coords(value, depth: int, where: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: coordinates are not numbers") from None
    if depth == 1:  # one position
        if a.shape not in ((2,), (3,)) or not np.isfinite(a).all():
            raise AnnotationError(f"{where}: a Point needs one [x, y] position, got shape {a.shape}")
        return a[None, :2]
    if a.ndim != 2 or a.shape[1] not in (2, 3) or not np.isfinite(a).all():
        raise AnnotationError(f"{where}: coordinates must be [x, y] positions, got shape {a.shape}")
    return a[:, :2]


def _polygon(rings, where: str):
    if not isinstance(rings, list) or not rings:
        raise AnnotationError(f"{where}: a Polygon needs at least one ring")
    out = []
    for r in rings:
        xy = _coords(r, 2, where)
        if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
            xy = xy[:-1]  # GeoJSON repeats the first position at the end
        if len(xy) < 3:
            raise AnnotationError(f"{where}: a polygon ring needs at least 3 distinct positions")
        out.append(xy)
    return out


def read_geojson(path, max_bytes: int = MAX_BYTES) -> List[Annotation]:
    """Annotations of a GeoJSON file: one per Point / MultiPoint / Polygon, one per polygon
    of a MultiPolygon. Properties are kept; ``group`` is the classification name."""
    path = os.fspath(path)
    data = read_bounded(path, max_bytes)

    def bad_constant(c):
        raise ValueError(f"{c} is not allowed")

    try:
        doc = json.loads(data, parse_constant=bad_constant)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        features = doc
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: expected a FeatureCollection, a Feature or a list of Features")
    out = []
    for i, f in enumerate(features):
        where = f"{path}: feature {i}"
        if not isinstance(f, dict) or f.get("type") != "Feature" or not isinstance(f.get("geometry"), dict):
            raise AnnotationError(f"{where}: not a Feature with a geometry")
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{where}: properties must be an object")
        cls = props.get("classification")
        group = cls.get("name", "") if isinstance(cls, dict) else (cls if isinstance(cls, str) else "")
        name = props.get("name", "") if isinstance(props.get("name", ""), str) else ""
        g = f["geometry"]
        kind, c = g.get("type"), g.get("coordinates")
        if kind == "Point":
            out.append(Annotation("points", _coords(c, 1, where), group, name, properties=props))
        elif kind == "MultiPoint":
            out.append(Annotation("points", _coords(c, 2, where), group, name, properties=props))
        elif kind == "Polygon":
            rings = _polygon(c, where)
            out.append(Annotation("polygon", rings[0], group, name, rings[1:], props))
        elif kind == "MultiPolygon":
            if not isinstance(c, list):
                raise AnnotationError(f"{where}: MultiPolygon coordinates must be a list of polygons")
            for poly in c:
                rings = _polygon(poly, where)
                out.append(Annotation("polygon", rings[0], group, name, rings[1:], props))
        else:
            raise AnnotationError(f"{where}: geometry type {kind!r} is not supported (Point, MultiPoint, "
                                  "Polygon, MultiPolygon)")
    return out


def _closed(ring: np.ndarray) -> list:
    return [[float(x), float(y)] for x, y in np.vstack([ring, ring[:1]])]


def geojson_features(annotations: Sequence[Annotation]) -> dict:
    """A FeatureCollection of ``annotations`` in QuPath's conventions."""
    feats = []
    for a in annotations:
        if a.kind == "points":
            geom = ({"type": "Point", "coordinates": [float(a.coords[0, 0]), float(a.coords[0, 1])]}
                    if len(a.coords) == 1 else
                    {"type": "MultiPoint", "coordinates": [[float(x), float(y)] for x, y in a.coords]})
        else:
            geom = {"type": "Polygon", "coordinates": [_closed(a.coords)] + [_closed(h) for h in a.holes]}
        props = {"objectType": "annotation", **{k: v for k, v in a.properties.items() if _jsonable(v)}}
        if a.name:
            props["name"] = a.name
        if a.group:
            props["classification"] = {"name": a.group}
        feats.append({"type": "Feature", "geometry": geom, "properties": props})
    return {"type": "FeatureCollection", "features": feats}


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def write_geojson(path, annotations: Sequence[Annotation], indent: Optional[int] = None) -> str:
    """Write ``annotations`` as a GeoJSON FeatureCollection, atomically."""
    return write_json(os.fspath(path), geojson_features(annotations), indent=indent)
