"""Tissue detection: Otsu's threshold on a low-resolution image plus morphology (the
Fast ScanNet pre-processing), or a user mask (binary or labels) at any downsample."""
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from ..masks import TissueMask

__all__ = ["TissueMask", "otsu_tissue_mask", "user_tissue_mask"]


def _otsu(values: np.ndarray) -> float:
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))


def otsu_tissue_mask(rgb: np.ndarray, downsample: float, min_saturation: int = 20) -> TissueMask:
    """Tissue where the saturation (max - min of RGB) exceeds Otsu's threshold (and at
    least ``min_saturation``, so a blank slide gives no tissue), then a closing and an
    opening with a 3x3 structuring element and removal of holes: scipy.ndimage's
    binary_closing, binary_opening and binary_fill_holes, pixel for pixel (outside the
    image counts as background for each dilation and erosion, as there), computed in
    whole-array passes (38 -> 4 ms for a 625 px thumbnail: it is part of every scan).

    ``rgb``: (h, w, 3 or more) uint8, a thumbnail; only its first three channels count
    (an alpha channel is not colour)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] < 3:
        raise InvalidArgumentError(f"the tissue detector takes an (h, w, 3) uint8 RGB image, got {rgb.dtype} "
                                   f"{rgb.shape}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    sat = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # max >= min: no wrap-around
    mask = sat > max(_otsu(sat), min_saturation)
    mask = _box3(_box3(mask, np.logical_or), np.logical_and)  # closing
    mask = _box3(_box3(mask, np.logical_and), np.logical_or)  # opening
    return TissueMask(_fill_holes(mask), float(downsample))


def _box3(mask: np.ndarray, op) -> np.ndarray:
    """Dilation (``op`` = logical_or) or erosion (logical_and) of a 2-D bool mask by the
    3x3 square, outside the mask counting as False: separable, a row pass then a column pass."""
    p = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)
    p[1:-1, 1:-1] = mask
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return op(op(rows[:-2], rows[1:-1]), rows[2:])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: the background regions (4-connected, as
    binary_fill_holes propagates) that do not reach the image's border."""
    from scipy import ndimage

    if mask.size == 0:
        return mask.copy()
    labels, n = ndimage.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    outside[0] = True  # label 0: the mask itself
    return mask | ~outside[labels]


def user_tissue_mask(image, slide_width: int, labels: Optional[Sequence[int]] = None) -> TissueMask:
    """A user's mask image (any downsample: inferred from its width): nonzero is tissue,
    or, for a label image, the pixels whose label is in ``labels``."""
    m = np.asarray(image)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2 or m.size == 0:
        raise InvalidArgumentError(f"tissue mask must be a 2-D image, got shape {m.shape}")
    mask = np.isin(m, list(labels)) if labels is not None else m != 0
    return TissueMask(mask, slide_width / m.shape[1])
