"""Reference of the mitosis candidate detector (Tellez et al. 2018, Sec. IV-A): the
definition as a literal loop, slow (one argmin over the whole image per candidate)."""
import math

import torch


def candidates_ref(intensity: torch.Tensor, below: float, r2: float) -> torch.Tensor:
    """``intensity``: (H, W) integer R + G + B. While some pixel not yet suppressed has an
    intensity below ``below``: take the darkest (the first in raster order among equals),
    record it, and suppress the disk dx^2 + dy^2 <= r2 around it. Returns (K,) raster
    indices in the order picked."""
    h, w = intensity.shape
    big = torch.iinfo(torch.int64).max
    v = intensity.to(torch.int64).flatten().clone()
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    picked = []
    while True:
        i = int(torch.argmin(v))  # the first minimum in raster order
        if not v[i] < below:  # also stops when everything is suppressed (big)
            break
        picked.append(i)
        y, x = divmod(i, w)
        disk = ((ys - y) ** 2 + (xs - x) ** 2 <= r2).flatten()
        v[disk] = big
    return torch.tensor(picked, dtype=torch.int64)


def disk_r2(d_um: float, mpp: float) -> float:
    """Squared radius in pixels of a disk of diameter ``d_um`` micrometres."""
    r = d_um / mpp / 2
    return r * r if math.isfinite(r) else math.inf
