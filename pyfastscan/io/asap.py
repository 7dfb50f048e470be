"""ASAP XML annotations (the CAMELYON ground truth format).

    <ASAP_Annotations>
      <Annotations>
        <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
          <Coordinates><Coordinate Order="0" X="62259.8" Y="111620.3"/> ...</Coordinates>
        </Annotation>
      </Annotations>
      <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"/></AnnotationGroups>
    </ASAP_Annotations>

Types Polygon, Rectangle and Spline read as polygons (a spline by its control points),
Dot and PointSet as points. The parser is expat driven by hand: a DOCTYPE, entity
declarations and external entities are refused before anything is expanded, the file size
is bounded, and every error names the file and the line and column where it broke.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

import numpy as np

from .files import write_text
from ._safe import MAX_BYTES, AnnotationError, parse_number, read_bounded
from .annotations import Annotation

_POLYGON = ("polygon", "rectangle", "spline")
_POINTS = ("dot", "pointset")


def read_asap_xml(path, max_bytes: int = MAX_BYTES) -> List[Annotation]:
    """The annotations of an ASAP XML file, in file order, their coordinates sorted by
    ``Order`` (a list, like :func:`~pyfastscan.io.read_geojson`; the groups' attributes
    come from :func:`read_asap_groups`).

    Raises AnnotationError naming the file and the line for malformed or hostile input."""
    return _parse_asap(path, max_bytes)[0]


def read_asap_groups(path, max_bytes: int = MAX_BYTES) -> Dict[str, dict]:
    """The ``<Group>`` declarations of an ASAP XML file: group name -> its attributes
    (``PartOfGroup``, ``Color``). Raises AnnotationError as :func:`read_asap_xml`."""
    return _parse_asap(path, max_bytes)[1]


def _parse_asap(path, max_bytes: int) -> Tuple[List[Annotation], Dict[str, dict]]:
    path = os.fspath(path)
    data = read_bounded(path, max_bytes)
    p = expat.ParserCreate()
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    annotations: List[Annotation] = []
    groups: Dict[str, dict] = {}
    state = {"ann": None, "coords": [], "stack": []}

    def where():
        return f"{path}: line {p.CurrentLineNumber}, column {p.CurrentColumnNumber + 1}"

    def refuse(*_):
        raise AnnotationError(f"{where()}: DTDs and entities are not allowed in annotation files")

    def start(tag, attrs):
        parent = state["stack"][-1] if state["stack"] else None
        state["stack"].append(tag)
        if parent is None and tag != "ASAP_Annotations":
            raise AnnotationError(f"{where()}: root element is <{tag}>, not <ASAP_Annotations>")
        if tag == "Annotation":
            if parent != "Annotations":
                raise AnnotationError(f"{where()}: <Annotation> outside <Annotations>")
            kind = attrs.get("Type", "Polygon").lower()
            if kind not in _POLYGON + _POINTS:
                raise AnnotationError(f"{where()}: unknown annotation Type={attrs.get('Type')!r}")
            state["ann"] = dict(attrs, kind="points" if kind in _POINTS else "polygon")
            state["coords"] = []
        elif tag == "Coordinate":
            if state["ann"] is None or parent != "Coordinates":
                raise AnnotationError(f"{where()}: <Coordinate> outside an annotation's <Coordinates>")
            w = where()
            order = attrs.get("Order", str(len(state["coords"])))
            try:
                order = int(order)
            except ValueError:
                raise AnnotationError(f"{w}: Order={order!r} is not an integer") from None
            x, y = parse_number(attrs.get("X"), w, "X"), parse_number(attrs.get("Y"), w, "Y")
            state["coords"].append((order, x, y))
        elif tag == "Group":
            if "Name" not in attrs:
                raise AnnotationError(f"{where()}: <Group> without a Name")
            groups[attrs["Name"]] = {k: v for k, v in attrs.items() if k != "Name"}

    def end(tag):
        state["stack"].pop()
        if tag == "Annotation":
            a = state["ann"]
            coords = sorted(state["coords"])
            xy = np.array([(x, y) for _, x, y in coords], dtype=np.float64).reshape(-1, 2)
            if a["kind"] == "polygon" and len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
                xy = xy[:-1]  # a closed ring written with its first point repeated
            props = {k: v for k, v in a.items() if k not in ("Name", "Type", "PartOfGroup", "kind")}
            props["type"] = a.get("Type", "Polygon")
            annotations.append(Annotation(a["kind"], xy, a.get("PartOfGroup", ""), a.get("Name", ""),
                                          properties=props))
            state["ann"] = None

    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.ExternalEntityRefHandler = refuse
    p.StartElementHandler = start
    p.EndElementHandler = end
    try:
        p.Parse(data, True)
    except expat.ExpatError as exc:
        raise AnnotationError(f"{path}: line {exc.lineno}, column {exc.offset + 1}: "
                              f"{expat.ErrorString(exc.code)}") from None
    return annotations, groups


_COLOURS = ("#F4FA58", "#64FE2E", "#FE2E2E", "#2E64FE", "#FE9A2E", "#BE81F7")


def asap_xml(annotations: Sequence[Annotation], groups: Optional[Dict[str, dict]] = None) -> str:
    """The ASAP XML text of ``annotations``; every group they use is declared."""
    groups = dict(groups or {})
    for a in annotations:
        if a.group and a.group not in groups:
            groups[a.group] = {"PartOfGroup": "None", "Color": _COLOURS[len(groups) % len(_COLOURS)]}
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for i, a in enumerate(annotations):
        kind = a.properties.get("type") or ("Polygon" if a.kind == "polygon" else
                                           "Dot" if len(a.coords) == 1 else "PointSet")
        if a.holes:
            raise AnnotationError(f"annotation {a.name or i!r} has holes, which ASAP XML cannot hold: write each "
                                  "hole as a polygon of an exclusion group")
        colour = a.properties.get("Color", groups.get(a.group, {}).get("Color", _COLOURS[0]))
        lines.append(f"\t\t<Annotation Name={quoteattr(a.name or f'Annotation {i}')} Type={quoteattr(kind)} "
                     f"PartOfGroup={quoteattr(a.group or 'None')} Color={quoteattr(colour)}>")
        lines.append("\t\t\t<Coordinates>")
        for k, (x, y) in enumerate(a.coords):
            lines.append(f'\t\t\t\t<Coordinate Order="{k}" X="{float(x)!r}" Y="{float(y)!r}" />')
        lines.append("\t\t\t</Coordinates>")
        lines.append("\t\t</Annotation>")
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for name, attrs in groups.items():
        lines.append(f"\t\t<Group Name={quoteattr(name)} PartOfGroup={quoteattr(attrs.get('PartOfGroup', 'None'))} "
                     f"Color={quoteattr(attrs.get('Color', _COLOURS[0]))}>")
        lines.append("\t\t\t<Attributes />")
        lines.append("\t\t</Group>")
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>", ""]
    return "\n".join(lines)


def write_asap_xml(path, annotations: Sequence[Annotation], groups: Optional[Dict[str, dict]] = None) -> str:
    """Write ``annotations`` as ASAP XML, atomically. Coordinates keep full float precision."""
    return write_text(os.fspath(path), asap_xml(annotations, groups))


def detections_to_annotations(detections, group: str = "detection") -> List[Annotation]:
    """Scan or mitosis detections (objects with probability, x, y) as point annotations whose
    name carries the probability: ASAP Dots in XML; in GeoJSON QuPath detection objects
    (``objectType: "detection"``) with the probability as the measurement "probability"."""
    return [Annotation("points", [[d.x, d.y]], group, name=f"p={d.probability:.6f}",
                       properties={"objectType": "detection", "measurements": {"probability": float(d.probability)}})
            for d in detections]
