"""Writing files so that an interrupted run never leaves a half-written one: write a
temporary file in the same folder, then os.replace it into place."""
import json
import os
import tempfile
from typing import Callable

from ..errors import InvalidArgumentError


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then move it into place;
    on any failure the temporary file is removed and ``path`` is untouched."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str, obj, indent=None) -> str:
    return write_text(path, json.dumps(obj, indent=indent))


def prepare_folder(folder: str) -> str:
    """Create ``folder`` and check it is writable, with an error naming it if not."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"output folder {folder} is not writable")
    return folder


STATUS = "status.json"  # in each slide's output folder: which slide, which job, running / failed / done


def write_status(folder: str, state: str, **fields) -> str:
    """Record the state of the slide job writing ``folder`` (atomically): "running" while
    it works, "failed" with the reason, "done" once report.json is written. A folder whose
    status is not "done" holds nothing complete."""
    return write_json(os.path.join(folder, STATUS), {"state": state, **fields}, indent=2)


def read_status(folder: str):
    """The folder's status record, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, STATUS), encoding="utf-8") as f:
            obj = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
