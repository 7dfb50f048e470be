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
    opening with a 3x3 structuring element and removal of holes."""
    from scipy import ndimage

    rgb = np.asarray(rgb)
    sat = (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).astype(np.uint8)
    mask = sat > max(_otsu(sat), min_saturation)
    st = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_opening(ndimage.binary_closing(mask, st), st)
    return TissueMask(ndimage.binary_fill_holes(mask), float(downsample))


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
