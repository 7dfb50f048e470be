"""Mitosis candidates (Tellez et al. 2018, Sec. IV-A), to sample training candidates and
hard negatives: discs of diameter d centred on the darkest remaining pixels.

    >>> import numpy as np, pyfastscan
    >>> rgb = np.full((200, 200, 3), 230, np.uint8); rgb[50:56, 60:66] = 40; rgb[150:155, 20:25] = 60
    >>> pyfastscan.mitosis.candidates(rgb, d_um=25, t=0.6, mpp=0.25).tolist()  # (K, 2) x, y
    [[60, 50], [20, 150]]

(also ``pyfastscan.ops.candidates``)

Definition (pyfastscan/reference/candidates.py): the intensity of a pixel is the mean of
its R, G, B (uint8) over 255. While a pixel not yet suppressed is darker than ``t``: take
the darkest (ties in raster order), record it, suppress every pixel within d / 2 of it
(dx^2 + dy^2 <= (d / 2 / mpp)^2). The comparisons run on the integer R + G + B, so both
implementations decide every pixel the same way. C++ (csrc/cpu/candidates_cpu.cpp): one
counting sort of the dark pixels, then the suppressed areas: O(N + suppressed area).
"""
import numpy as np
import torch

from .. import _native
from ..backends import Impl, dispatch
from ..errors import InvalidArgumentError
from ..reference.candidates import candidates_ref, disk_r2
from ..validate import POSITIVE, UNIT, check


def candidates(image, *, mpp: float, d_um: float = 25.0, t: float = 0.6, backend: str = "auto") -> np.ndarray:
    """Mitosis candidates of an RGB image.

    Args:
        image: (H, W, 3) uint8 RGB, numpy or a CPU tensor.
        d_um: diameter of the suppressed disc in um (Tellez: 25 um).
        t: intensity threshold in [0, 1] on the mean of R, G, B over 255 (Tellez: 0.6).
        mpp: micrometres per pixel of ``image`` (required: the disc is d_um / mpp pixels
            wide, and no resolution is right for every image).
        backend: "auto", "cpu" (C++) or "torch" (the reference loop).
    Returns:
        (K, 2) int64 (x, y) pixel positions, in the order picked (darkest first).

    Example:
        >>> img = np.full((64, 64, 3), 230, np.uint8); img[30:34, 40:44] = 20
        >>> candidates(img, d_um=10, mpp=0.5).tolist()
        [[40, 30]]
    """
    img = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    if img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
        raise InvalidArgumentError(f"image must be (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}")
    d_um, mpp, t = check("d_um", d_um, POSITIVE), check("mpp", mpp), check("t", t, UNIT)
    intensity = img[..., :3].astype(np.uint16).sum(axis=2, dtype=np.uint16)
    idx = dispatch("candidates", backend, _IMPLS, torch.device("cpu"), intensity, t * 765.0, disk_r2(d_um, mpp))
    w = intensity.shape[1]
    return np.stack([idx % w, idx // w], axis=1).astype(np.int64).reshape(-1, 2)


def candidates_cpu(intensity: np.ndarray, below: float, r2: float) -> np.ndarray:
    """C++ (csrc/cpu/candidates_cpu.cpp): one counting sort, then the suppressed discs."""
    return _native.cpu().mitosis_candidates(np.ascontiguousarray(intensity), below, r2)


def _torch(intensity: np.ndarray, below: float, r2: float) -> np.ndarray:
    return candidates_ref(torch.from_numpy(intensity.astype(np.int64)), below, r2).numpy()


_IMPLS = {"torch": Impl(_torch), "cpu": Impl(candidates_cpu)}
