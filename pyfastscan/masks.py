"""A boolean mask over a slide's level-0 coordinates, at any downsample. Below the ops and
the slide readers alike: tissue detection (slide/tissue.py) makes one, the ROI plan and the
hotspot counts (ops/hotspot.py) read it."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class TissueMask:
    """Boolean mask of the slide; ``downsample`` level-0 pixels per mask pixel."""

    mask: np.ndarray
    downsample: float
    _sat: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    def area_mm2(self, mpp: float) -> float:
        return float(self.mask.sum()) * (self.downsample * mpp / 1000) ** 2

    def on_grid(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Mask values at every (y, x) of the grid ys x xs (1-D arrays of level-0 pixel
        coordinates): (len(ys), len(xs)) bool; the mask pixel containing each point,
        clamped to the mask."""
        d = self.downsample
        iy = np.clip((np.asarray(ys, dtype=np.float64) / d).astype(np.int64), 0, self.mask.shape[0] - 1)
        ix = np.clip((np.asarray(xs, dtype=np.float64) / d).astype(np.int64), 0, self.mask.shape[1] - 1)
        return self.mask[iy[:, None], ix[None, :]]

    def any_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Is there tissue in the level-0 box [x0, x1) x [y0, y1)?"""
        d = self.downsample
        r0, r1 = max(0, int(y0 // d)), min(self.mask.shape[0], int(np.ceil(y1 / d)))
        c0, c1 = max(0, int(x0 // d)), min(self.mask.shape[1], int(np.ceil(x1 / d)))
        return bool(r1 > r0 and c1 > c0 and self.mask[r0:r1, c0:c1].any())

    def boxes_touching(self, xs: np.ndarray, ys: np.ndarray, side: float) -> np.ndarray:
        """For every top-left corner (y, x) of the grid ys x xs (level-0 pixels): is there
        tissue in the box [x, x + side) x [y, y + side)? (len(ys), len(xs)) bool, the same
        answer as :meth:`any_in` for each box, from a summed-area table of the mask."""
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        return self.any_in_grid(xs, xs + side, ys, ys + side)

    def any_in_grid(self, x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
        """:meth:`any_in` for every box [x0[j], x1[j]) x [y0[i], y1[i]) (level-0 pixels):
        (len(y0), len(x0)) bool, from a summed-area table of the mask."""
        if self._sat is None:
            sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=sat[1:, 1:])
            self._sat = sat
        d = self.downsample
        h, w = self.mask.shape
        x0, x1, y0, y1 = (np.asarray(v, dtype=np.float64) for v in (x0, x1, y0, y1))
        r0 = np.clip(np.floor(y0 / d), 0, h).astype(np.int64)
        r1 = np.clip(np.ceil(y1 / d), 0, h).astype(np.int64)
        c0 = np.clip(np.floor(x0 / d), 0, w).astype(np.int64)
        c1 = np.clip(np.ceil(x1 / d), 0, w).astype(np.int64)
        r1, c1 = np.maximum(r1, r0), np.maximum(c1, c0)
        sat = self._sat
        r0, r1, c0, c1 = r0[:, None], r1[:, None], c0[None, :], c1[None, :]
        count = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        return count > 0
