"""One entry point for every annotation format the package reads, chosen by extension."""
import os
from typing import List, Optional, Union

from ._safe import AnnotationError
from .annotations import Annotation

ANNOTATION_EXTENSIONS = (".xml", ".geojson", ".json", ".sqlite", ".sqlite3", ".db")


def read_annotations(path, slide: Optional[Union[int, str]] = None,
                     cls: Optional[Union[int, str]] = None) -> List[Annotation]:
    """The annotations of an ASAP XML (.xml), GeoJSON (.geojson, .json) or SlideRunner
    database (.sqlite, .sqlite3, .db) file, in level-0 pixels. A SlideRunner database
    holds many slides: ``slide`` (its filename or uid) says which, ``cls`` which class
    (default "Mitotic figure"); its points come back as one point annotation."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".xml":
        from .asap import read_asap_xml

        return read_asap_xml(path)
    if ext in (".geojson", ".json"):
        from .geojson import read_geojson

        return list(read_geojson(path))
    if ext in (".sqlite", ".sqlite3", ".db"):
        from .sliderunner import read_sliderunner_points

        if slide is None:
            raise AnnotationError(f"{path}: a SlideRunner database holds many slides: say which one")
        cls = cls or "Mitotic figure"
        pts = read_sliderunner_points(path, slide, cls)
        return [Annotation("points", pts, str(cls))] if len(pts) else []
    raise AnnotationError(f"{path}: unknown annotation format {ext or '(no extension)'!r}; expected one of "
                          f"{', '.join(ANNOTATION_EXTENSIONS)}")
