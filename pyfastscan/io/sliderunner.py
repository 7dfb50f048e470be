"""SlideRunner SQLite databases (the canine mammary carcinoma and MIDOG datasets).

Tables read: ``Slides(uid, filename)``, ``Classes(uid, name)``, ``Annotations(uid, slide,
agreedClass, type[, deleted])`` and ``Annotations_coordinates(annoId, coordinateX,
coordinateY, orderIdx)``. The database is opened read-only, only fixed parameterised
queries run (no SQL from the caller), and a file that is not SQLite or lacks these tables
is an AnnotationError naming the file.
"""
import os
import sqlite3
from typing import Dict, Union

import numpy as np

from ._safe import AnnotationError

_TABLES = {"Slides": ("uid", "filename"), "Classes": ("uid", "name"),
           "Annotations": ("uid", "slide", "agreedClass", "type"),
           "Annotations_coordinates": ("annoId", "coordinateX", "coordinateY")}


class SlideRunnerDB:
    """A SlideRunner database opened read-only. Use as a context manager or close()."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise AnnotationError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise AnnotationError(f"{self.path}: not an SQLite database")
        try:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
            self._columns = {}
            for table, needed in _TABLES.items():
                cols = {r[1] for r in self._db.execute("SELECT * FROM pragma_table_info(?)", (table,))}
                missing = [c for c in needed if c not in cols]
                if missing:
                    raise AnnotationError(f"{self.path}: not a SlideRunner database (table {table} lacks "
                                          f"{', '.join(missing)})")
                self._columns[table] = cols
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:  # a corrupt schema may not even be UTF-8
            raise AnnotationError(f"{self.path}: unreadable SQLite database ({exc})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, args=()):
        try:
            return self._db.execute(sql, args).fetchall()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise AnnotationError(f"{self.path}: {exc}") from None

    def _table(self, sql: str, what: str) -> Dict[int, str]:
        try:
            return {int(u): str(n) for u, n in self._query(sql)}
        except (TypeError, ValueError):
            raise AnnotationError(f"{self.path}: malformed {what} (a uid that is not an integer)") from None

    def slides(self) -> Dict[int, str]:
        """uid -> filename."""
        return self._table("SELECT uid, filename FROM Slides", "Slides table")

    def classes(self) -> Dict[int, str]:
        """uid -> class name (for example "Mitotic figure")."""
        return self._table("SELECT uid, name FROM Classes", "Classes table")

    def _uid(self, table: str, value: Union[int, str], names: Dict[int, str], what: str) -> int:
        if isinstance(value, int):
            if value not in names:
                raise AnnotationError(f"{self.path}: no {what} with uid {value}")
            return value
        hits = [u for u, n in names.items() if n == value or (what == "slide" and os.path.basename(n) == value)]
        if not hits:
            raise AnnotationError(f"{self.path}: no {what} named {value!r} (known: {', '.join(sorted(names.values()))})")
        return hits[0]

    def points(self, slide: Union[int, str], cls: Union[int, str] = "Mitotic figure") -> np.ndarray:
        """(N, 2) float64 level-0 (x, y) of the annotations of class ``cls`` (uid or name,
        by their agreed class) on ``slide`` (uid or filename), one per annotation: the
        centre of its coordinates (a spot's one point, a circle's two opposite corners),
        ordered by annotation uid. Deleted annotations are left out."""
        s = self._uid("Slides", slide, self.slides(), "slide")
        c = self._uid("Classes", cls, self.classes(), "class")
        deleted = " AND (a.deleted IS NULL OR a.deleted = 0)" if "deleted" in self._columns["Annotations"] else ""
        rows = self._query("SELECT a.uid, AVG(ac.coordinateX), AVG(ac.coordinateY) FROM Annotations a "
                           "JOIN Annotations_coordinates ac ON ac.annoId = a.uid "
                           "WHERE a.slide = ? AND a.agreedClass = ?" + deleted + " GROUP BY a.uid ORDER BY a.uid",
                           (s, c))
        try:
            pts = np.array([(x, y) for _, x, y in rows], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            pts = np.array([np.nan])
        if not np.isfinite(pts).all():
            raise AnnotationError(f"{self.path}: non-numeric coordinates for slide {slide!r}, class {cls!r}")
        return pts


def read_sliderunner_points(path, slide: Union[int, str], cls: Union[int, str] = "Mitotic figure") -> np.ndarray:
    """The points of class ``cls`` on ``slide`` in the SlideRunner database at ``path``."""
    with SlideRunnerDB(path) as db:
        return db.points(slide, cls)
