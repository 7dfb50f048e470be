"""Annotation formats: ASAP XML, GeoJSON and SlideRunner round trips, rasterisation against
a brute-force point-in-polygon test, heat-map contours, and hostile or broken files
(fuzzed with hypothesis): only AnnotationError, naming the file and the place."""
import os
import sqlite3

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfastscan.io import (Annotation, AnnotationError, SlideRunnerDB, contours, rasterize, read_asap_groups, read_asap_xml,
                           read_geojson, read_sliderunner_points, write_asap_xml, write_geojson)


def _inside(x, y, ring):
    """Even-odd point-in-polygon by ray casting to the right: the literal definition."""
    inside = False
    n = len(ring)
    for k in range(n):
        (x0, y0), (x1, y1) = ring[k], ring[(k + 1) % n]
        if (y0 <= y < y1) or (y1 <= y < y0):
            if x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
                inside = not inside
    return inside


def _brute(polys, shape, d):
    out = np.zeros(shape, dtype=bool)
    for r in range(shape[0]):
        for c in range(shape[1]):
            x, y = (c + 0.5) * d, (r + 0.5) * d
            out[r, c] = any(sum(_inside(x, y, ring) for ring in [p.coords, *p.holes]) % 2 for p in polys)
    return out


def test_rasterize_equals_point_in_polygon():
    rng = np.random.default_rng(0)
    for seed in range(5):
        polys = [Annotation("polygon", rng.random((rng.integers(3, 9), 2)) * 400, "_0") for _ in range(3)]
        polys.append(Annotation("polygon", [[50, 50], [350, 60], [300, 330], [40, 300]], "_1",
                                holes=[[[100, 100], [200, 110], [150, 200]]]))
        for d in (8.0, 13.0):
            shape = (int(420 / d), int(430 / d))
            assert np.array_equal(rasterize(polys, shape, d), _brute(polys, shape, d))


def test_exclusion_groups_are_removed():
    tumour = Annotation("polygon", [[0, 0], [100, 0], [100, 100], [0, 100]], "_0")
    normal = Annotation("polygon", [[20, 20], [60, 20], [60, 60], [20, 60]], "_2")
    m = rasterize([normal, tumour], (10, 10), 10.0)  # exclusions win whatever the order
    assert m.sum() == 100 - 16 and not m[2:6, 2:6].any()
    assert rasterize([tumour, normal], (10, 10), 10.0, exclude_groups=()).all()
    assert not rasterize([tumour], (10, 10), 10.0, groups=["_1"]).any()


def test_asap_round_trip(tmp_path):
    anns = [Annotation("polygon", [[1.5, 2.25], [1000.125, 3.0], [500.0, 800.75]], "_0", "Annotation 0"),
            Annotation("polygon", [[10, 10], [20, 10], [20, 20]], "_2", "Annotation 1"),
            Annotation("points", [[42.0, 43.5]], "mitosis", "Dot <&> \"1\"")]
    path = write_asap_xml(tmp_path / "a.xml", anns)
    back, groups = read_asap_xml(path), read_asap_groups(path)
    assert isinstance(back, list)  # the same return type as read_geojson
    assert set(groups) == {"_0", "_2", "mitosis"}
    assert [(a.kind, a.group, a.name) for a in back] == [(a.kind, a.group, a.name) for a in anns]
    for a, b in zip(anns, back):
        assert np.array_equal(a.coords, b.coords)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


CAMELYON_STYLE = """<?xml version="1.0"?>
<ASAP_Annotations>
\t<Annotations>
\t\t<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="2" X="300" Y="0" />
\t\t\t\t<Coordinate Order="0" X="0" Y="0" />
\t\t\t\t<Coordinate Order="1" X="150,5" Y="300" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t</Annotations>
\t<AnnotationGroups>
\t\t<Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
\t</AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_orders_coordinates_and_reads_decimal_commas(tmp_path):
    p = tmp_path / "c.xml"
    p.write_text(CAMELYON_STYLE)
    (a,), groups = read_asap_xml(p), read_asap_groups(p)
    assert a.coords.tolist() == [[0, 0], [150.5, 300], [300, 0]] and groups["_0"]["Color"] == "#ff0000"


@pytest.mark.parametrize("text,where", [
    ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>\n'
     "<ASAP_Annotations>&lol2;</ASAP_Annotations>", "DTDs and entities are not allowed"),
    ('<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
     "<ASAP_Annotations>&xxe;</ASAP_Annotations>", "DTDs and entities are not allowed"),
    ("<ASAP_Annotations>\n<Annotations>\n<Annotation Type=\"Polygon\">\n<Coordinates>\n"
     "<Coordinate Order=\"0\" X=\"1\" Y=\"oops\"/>", "line 5.*Y='oops' is not a number"),
    ("<ASAP_Annotations>\n<Annotations>\n</Annotation>", "line 3, column 3: mismatched tag"),
    ("<Other/>", "root element is <Other>"),
    ("<ASAP_Annotations><Coordinate X='1' Y='2'/></ASAP_Annotations>", "outside an annotation"),
    ("<ASAP_Annotations><Annotations><Annotation Type='Ellipse'/></Annotations></ASAP_Annotations>",
     "unknown annotation Type"),
    ("<ASAP_Annotations><Annotations><Annotation><Coordinates><Coordinate X='nan' Y='1'/>", "not finite"),
])
def test_hostile_and_broken_xml_name_the_file_and_place(tmp_path, text, where):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(AnnotationError, match=r"bad\.xml.*" + where):
        read_asap_xml(p)


def test_size_limit_and_missing_file(tmp_path):
    p = tmp_path / "big.xml"
    p.write_text(CAMELYON_STYLE)
    with pytest.raises(AnnotationError, match="limit"):
        read_asap_xml(p, max_bytes=100)
    with pytest.raises(AnnotationError, match="missing.xml"):
        read_asap_xml(tmp_path / "missing.xml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), cut=st.integers(0, len(CAMELYON_STYLE)))
def test_fuzz_asap_raises_only_annotation_errors(tmp_path, data, cut):
    p = tmp_path / "fuzz.xml"
    p.write_bytes(CAMELYON_STYLE.encode()[:cut] + data)
    try:
        read_asap_xml(p)
    except AnnotationError as exc:
        assert "fuzz.xml" in str(exc)


def test_geojson_round_trip_with_holes_and_points(tmp_path):
    anns = [Annotation("polygon", [[0, 0], [100, 0], [100, 80], [0, 80]], "Tumor", "t",
                       holes=[[[10, 10], [20, 10], [20, 20]]], properties={"score": 0.5}),
            Annotation("points", [[5.5, 6.5]], "Mitosis", properties={"probability": 0.97}),
            Annotation("points", [[1, 2], [3, 4]], "Other")]
    path = write_geojson(tmp_path / "a.geojson", anns)
    back = read_geojson(path)
    assert [(a.kind, a.group) for a in back] == [("polygon", "Tumor"), ("points", "Mitosis"), ("points", "Other")]
    assert np.array_equal(back[0].coords, anns[0].coords) and np.array_equal(back[0].holes[0], anns[0].holes[0])
    assert back[0].properties["score"] == 0.5 and back[1].properties["probability"] == 0.97
    assert np.array_equal(back[2].coords, anns[2].coords)
    # rasterising before and after the round trip gives the same mask
    assert np.array_equal(rasterize(anns, (12, 12), 10.0), rasterize(back, (12, 12), 10.0))


@pytest.mark.parametrize("text,where", [
    ('{"type": "FeatureCollection",\n "features": [1, 2,]}', r"line 2, column \d+"),
    ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 1]}}', "NaN is not allowed"),
    ('{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}',
     "feature 0: geometry type 'LineString'"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]',
     "feature 0: a polygon ring needs at least 3"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": "x"}}]', "feature 0"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
])
def test_broken_geojson_names_the_file_and_place(tmp_path, text, where):
    p = tmp_path / "bad.geojson"
    p.write_text(text)
    with pytest.raises(AnnotationError, match=r"bad\.geojson.*" + where):
        read_geojson(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(
                            st.sampled_from(["type", "features", "geometry", "coordinates", "properties",
                                             "Feature", "Point", "Polygon"]), c, max_size=4), max_leaves=20))
def test_fuzz_geojson_raises_only_annotation_errors(tmp_path, doc):
    import json

    p = tmp_path / "fuzz.geojson"
    p.write_text(json.dumps(doc))
    try:
        read_geojson(p)
    except AnnotationError as exc:
        assert "fuzz.geojson" in str(exc)


def test_contours_round_trip_to_the_mask(tmp_path):
    """Outlines along cell edges, written as ASAP XML and rasterised on the map's grid, give
    the thresholded map back: blobs, a hole, a diagonal touch, the map's border, a ragged
    random region."""
    rng = np.random.default_rng(3)
    m = np.zeros((30, 40), dtype=bool)
    m[2:12, 3:15] = True
    m[5:8, 6:9] = False  # a hole
    m[12, 15] = True  # touches the block only at a corner
    m[20:30, 30:40] = True  # on the border
    m[15:25, 2:12] = rng.random((10, 10)) > 0.5
    m[14, :] = m[:, 13] = m[:, 28] = False  # keep the regions apart
    polys = contours(m, stride_px=16.0, origin_px=(8.0, 8.0))
    assert sum(p.group == "_2" for p in polys) >= 1
    back = read_asap_xml(write_asap_xml(tmp_path / "c.xml", polys))
    # cell (i, j) is centred at 8 + 16 * (j, i): the pixel centres of a grid of downsample 16
    got = rasterize(back, m.shape, 16.0)
    lakes = ndimage_islands(m)
    assert np.array_equal(got, m & ~lakes)


def ndimage_islands(m):
    """Cells of regions that lie inside a hole of another region: drawn after, the hole
    removes them (the one case contours cannot give back)."""
    from scipy import ndimage

    lab, n = ndimage.label(m)
    out = np.zeros_like(m)
    for k in range(1, n + 1):
        others = ndimage.binary_fill_holes(m & (lab != k)) & ~(m & (lab != k))
        out |= (lab == k) & others
    return out


def test_contours_of_an_island_in_a_hole():
    m = np.zeros((9, 9), dtype=bool)
    m[1:8, 1:8] = True
    m[2:7, 2:7] = False
    m[4, 4] = True  # an island in the ring's hole
    assert ndimage_islands(m).sum() == 1
    assert rasterize(contours(m), m.shape, 1.0).sum() == m.sum() - 1


def test_contour_polygons_label_only_the_masks_box_and_give_the_same_outlines(monkeypatch):
    """The regions are labelled within the mask's bounding box (int32 labels of a whole
    80k px slide's map were 400 MB), and the outlines, names and peaks are those of the
    same mask with no margin, moved by the margin."""
    from scipy import ndimage

    from pyfastscan.io import contour_polygons

    rng = np.random.default_rng(5)
    m = np.zeros((30, 40), dtype=bool)
    m[2:12, 3:15] = True
    m[5:8, 6:9] = False  # a hole
    m[20:30, 30:40] = True
    m[15:25, 2:12] = rng.random((10, 10)) > 0.5
    v = rng.random(m.shape).astype(np.float32)
    big, vbig = np.zeros((100, 120), dtype=bool), np.zeros((100, 120), dtype=np.float32)
    big[37:67, 51:91], vbig[37:67, 51:91] = m, v
    shapes = []
    label = ndimage.label
    monkeypatch.setattr(ndimage, "label", lambda a, *k, **kw: shapes.append(a.shape) or label(a, *k, **kw))
    got = contour_polygons(big, 16.0, (8.0, 8.0), values=vbig)
    assert shapes == [(28, 38)]  # rows 39..66 (m's first row is empty), cols 53..90
    want = contour_polygons(m, 16.0, (8.0 + 51 * 16, 8.0 + 37 * 16), values=v)
    assert len(got) == len(want) > 3
    for a, b in zip(got, want):
        assert (a.name, a.group, a.properties) == (b.name, b.group, b.properties)
        assert np.array_equal(a.coords, b.coords) and len(a.holes) == len(b.holes)
        assert all(np.array_equal(h, k) for h, k in zip(a.holes, b.holes))
    assert contour_polygons(np.zeros((50, 50), dtype=bool)) == []


def test_halve_in_bands_is_the_halving_of_the_whole():
    from pyfastscan.io.images import halve

    rng = np.random.default_rng(0)
    for shape in ((37, 29), (40, 31, 3), (1, 9), (9, 1), (64, 64)):
        for a in (rng.integers(0, 256, shape, dtype=np.uint8), rng.random(shape, dtype=np.float32)):
            whole = halve(a, band=1 << 30)
            for band in (2, 3, 8):
                got = halve(a, band=band)
                assert got.dtype == a.dtype and np.array_equal(got, whole), (shape, a.dtype, band)
    a = np.array([[1, 2], [3, 5]], dtype=np.uint8)
    assert halve(a).tolist() == [[3]]  # (11 + 2) // 4: rounding half up


def _sliderunner(path, deleted_column=True):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE Slides (uid INTEGER PRIMARY KEY, filename TEXT, width INT, height INT)")
    db.execute("CREATE TABLE Classes (uid INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE Annotations (uid INTEGER PRIMARY KEY, slide INT, agreedClass INT, type INT"
               + (", deleted INT DEFAULT 0)" if deleted_column else ")"))
    db.execute("CREATE TABLE Annotations_coordinates (uid INTEGER PRIMARY KEY, coordinateX REAL, coordinateY REAL, "
               "slide INT, annoId INT, orderIdx INT)")
    db.executemany("INSERT INTO Slides VALUES (?, ?, 1000, 1000)", [(1, "a.svs"), (2, "b.svs")])
    db.executemany("INSERT INTO Classes VALUES (?, ?)", [(1, "Mitotic figure"), (2, "Mitotic figure lookalike")])
    rows = [(1, 1, 1, 1, [(10, 20)]), (2, 1, 1, 2, [(100, 200), (150, 260)]),  # spot; circle by its corners
            (3, 1, 2, 1, [(5, 5)]), (4, 2, 1, 1, [(7, 7)])]
    for uid, slide, cls, typ, coords in rows:
        db.execute("INSERT INTO Annotations (uid, slide, agreedClass, type) VALUES (?, ?, ?, ?)",
                   (uid, slide, cls, typ))
        for k, (x, y) in enumerate(coords):
            db.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                       "VALUES (?, ?, ?, ?, ?)", (x, y, slide, uid, k))
    if deleted_column:
        db.execute("INSERT INTO Annotations (uid, slide, agreedClass, type, deleted) VALUES (5, 1, 1, 1, 1)")
        db.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                   "VALUES (999, 999, 1, 5, 0)")
    db.commit()
    db.close()
    return str(path)


@pytest.mark.parametrize("deleted_column", [True, False])
def test_sliderunner_points(tmp_path, deleted_column):
    path = _sliderunner(tmp_path / "db.sqlite", deleted_column)
    pts = read_sliderunner_points(path, "a.svs", "Mitotic figure")
    assert pts.tolist() == [[10, 20], [125, 230]]  # the deleted one is left out
    with SlideRunnerDB(path) as db:
        assert db.classes() == {1: "Mitotic figure", 2: "Mitotic figure lookalike"}
        assert db.points(2, 1).tolist() == [[7, 7]] and db.points(1, "Mitotic figure lookalike").tolist() == [[5, 5]]
        with pytest.raises(AnnotationError, match="no class named 'Tumour'"):
            db.points(1, "Tumour")
        with pytest.raises(AnnotationError, match="no slide named 'c.svs'"):
            db.points("c.svs")
    # names are data, never SQL
    assert read_sliderunner_points(path, "a.svs", 1).shape == (2, 2)
    with pytest.raises(AnnotationError):
        read_sliderunner_points(path, "a.svs' OR 1=1 --")


def test_sliderunner_bad_files(tmp_path):
    (tmp_path / "x.sqlite").write_text("not a database")
    with pytest.raises(AnnotationError, match=r"x\.sqlite: not an SQLite database"):
        SlideRunnerDB(tmp_path / "x.sqlite")
    db = sqlite3.connect(tmp_path / "other.sqlite")
    db.execute("CREATE TABLE Slides (uid INTEGER PRIMARY KEY, filename TEXT)")
    db.commit()
    db.close()
    with pytest.raises(AnnotationError, match="not a SlideRunner database"):
        SlideRunnerDB(tmp_path / "other.sqlite")
    good = _sliderunner(tmp_path / "db.sqlite")
    data = open(good, "rb").read()
    (tmp_path / "cut.sqlite").write_bytes(data[:len(data) // 2])
    with pytest.raises(AnnotationError, match="cut.sqlite"):
        read_sliderunner_points(tmp_path / "cut.sqlite", "a.svs")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_sliderunner_raises_only_annotation_errors(tmp_path, flips):
    """Bytes of a valid database overwritten at random: points come back or an
    AnnotationError names the file; nothing else escapes."""
    good = tmp_path / "good.sqlite"
    if not good.exists():
        _sliderunner(good)
    data = bytearray(good.read_bytes())
    for pos, val in flips:
        data[pos % len(data)] = val
    bad = tmp_path / "fuzz.sqlite"
    bad.write_bytes(bytes(data))
    try:
        pts = read_sliderunner_points(bad, "a.svs")
        assert pts.ndim == 2 and pts.shape[1] == 2
    except AnnotationError as exc:
        assert "fuzz.sqlite" in str(exc)
