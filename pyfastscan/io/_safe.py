"""Shared guards for annotation parsers: a size limit read before parsing, and errors that
name the file and where it broke."""
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
