"""Resumable scans: an append-only log of finished ROIs.

The scan appends each ROI's map block to the log as soon as it is computed. A process
that is interrupted (Ctrl-C, SIGKILL, a full disk) leaves at worst a truncated last record,
which is detected by its length and checksum and dropped. A resumed scan whose key (the
slide, the model weights, every parameter that changes the map) matches the log's header
copies the finished blocks into its map and reads and computes only the others.

File layout: one header line ``PFSCKPT1 <json key>\\n``, then records
``<4i r0 c0 rows cols><I crc32 of the data><float32 data rows*cols>``, little-endian.
"""
import hashlib
import json
import os
import struct
import weakref
import zlib
from typing import Set, Tuple

import numpy as np
import torch

from ..errors import InvalidArgumentError

_MAGIC = b"PFSCKPT1 "
_RECORD = struct.Struct("<4iI")


_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (stamp, digest)


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's parameters and buffers (names, shapes, dtypes, values).
    Remembered per model while its tensors are the same objects at the same version (an
    in-place change such as load_state_dict bumps the version), so a cohort's slides and
    the Ray driver do not hash the same weights again (0.12 s for VGG16)."""
    items = sorted(model.state_dict(keep_vars=True).items())  # the tensors themselves
    try:
        stamp = [(name, t, t._version) for name, t in items]  # holds them: an id is never reused meanwhile
    except RuntimeError:  # inference tensors have no version counter: hash every time
        stamp = None
    known = _DIGESTS.get(model) if stamp is not None else None
    if known is not None and len(known[0]) == len(stamp) and all(
            n == m and t is u and v == w for (n, t, v), (m, u, w) in zip(known[0], stamp)):
        return known[1]
    h = hashlib.blake2b(digest_size=16)
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 1-D: a size-1 last dim may have any stride
    digest = h.hexdigest()
    if stamp is not None:
        _DIGESTS[model] = (stamp, digest)
    return digest


class RoiLog:
    """The log of one scan. ``open`` it with the scan's key; ``resume=True`` keeps the
    blocks a previous run with the same key finished, otherwise the log starts empty."""

    def __init__(self, path: str, key: dict, resume: bool):
        self.path = path
        header = _MAGIC + json.dumps(key, sort_keys=True).encode() + b"\n"
        self.blocks = []
        if resume and os.path.exists(path):
            self.blocks, good = self._read(path, header)
            with open(path, "r+b") as f:  # drop a truncated tail so appends stay aligned
                f.truncate(good)
            self._f = open(path, "ab")
        else:
            folder = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)
                self._f = open(path, "wb")
            except OSError as exc:
                raise InvalidArgumentError(f"cannot write the checkpoint {path}: {exc.strerror}") from None
            self._f.write(header)
            self._f.flush()

    @staticmethod
    def _read(path: str, header: bytes) -> Tuple[list, int]:
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(_MAGIC):
            raise InvalidArgumentError(f"{path}: not a pyfastscan checkpoint")
        end = data.find(b"\n")
        if data[:end + 1] != header:
            ours = json.loads(header[len(_MAGIC):])
            try:
                theirs = json.loads(data[len(_MAGIC):end])
            except ValueError:
                theirs = {}
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise InvalidArgumentError(f"{path}: the checkpoint belongs to a different scan (differs in "
                                       f"{', '.join(diff) or 'its header'}); scan without resume to start over")
        pos, blocks = end + 1, []
        while pos + _RECORD.size <= len(data):
            r0, c0, rows, cols, crc = _RECORD.unpack_from(data, pos)
            n = rows * cols * 4
            body = data[pos + _RECORD.size:pos + _RECORD.size + n]
            if rows <= 0 or cols <= 0 or len(body) < n or zlib.crc32(body) != crc:
                break  # a record cut short by the interruption
            blocks.append((r0, c0, np.frombuffer(body, dtype="<f4").reshape(rows, cols)))
            pos += _RECORD.size + n
        return blocks, pos

    def done(self) -> Set[Tuple[int, int]]:
        return {(r0, c0) for r0, c0, _ in self.blocks}

    def restore(self, heat: np.ndarray) -> None:
        for r0, c0, block in self.blocks:
            heat[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block

    def append(self, r0: int, c0: int, block: np.ndarray) -> None:
        body = np.ascontiguousarray(block, dtype="<f4").tobytes()
        self._f.write(_RECORD.pack(r0, c0, block.shape[0], block.shape[1], zlib.crc32(body)) + body)
        self._f.flush()

    def close(self) -> None:
        self._f.close()
