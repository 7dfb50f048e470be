"""Shared guards for annotation parsers: a size limit read before parsing, and errors that
name the file and where it broke."""
import math
import os

from ..errors import PyfastscanError

MAX_BYTES = 512 << 20  # an annotation file larger than this is refused (bounded memory)


class AnnotationError(PyfastscanError, ValueError):
    """An annotation file that cannot be read: missing, too large, malformed or hostile."""


def read_bounded(path, max_bytes: int = MAX_BYTES) -> bytes:
    """The file's bytes, refusing a missing file or one larger than ``max_bytes``."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise AnnotationError(f"{path}: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise AnnotationError(f"{path}: {size} bytes, more than the {max_bytes}-byte limit for annotation files "
                              "(pass max_bytes= to raise it)")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def parse_number(text, where: str, what: str = "value") -> float:
    """A finite float from ``text``; a decimal comma (no dot) is read as a point, as some
    CAMELYON files were written. AnnotationError naming ``where`` otherwise."""
    if text is None:
        raise AnnotationError(f"{where}: no {what}")
    t = text.strip()
    if "," in t and "." not in t:
        t = t.replace(",", ".")
    try:
        v = float(t)
    except ValueError:
        raise AnnotationError(f"{where}: {what}={text!r} is not a number") from None
    if not math.isfinite(v):
        raise AnnotationError(f"{where}: {what}={text!r} is not finite")
    return v
