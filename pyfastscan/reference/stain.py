"""Reference H&E colour deconvolution and stain augmentation: DESIGN.md 3, transcribed.

Images here are channel-last (..., 3) float tensors in [0, 1]; pyfastscan.ops.stain moves
channels and converts dtypes around these functions.
"""
import math

import torch

# Ruifrok-Johnston stain vectors as scikit-image uses them: rows H, E, DAB.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
EPS = 1e-6
LOG_ADJUST = -math.log(EPS)  # 13.8155...


def rgb_from_hed(dtype=torch.float64, device=None) -> torch.Tensor:
    return torch.tensor(RGB_FROM_HED, dtype=torch.float64, device=device).to(dtype)


def hed_from_rgb(dtype=torch.float64, device=None) -> torch.Tensor:
    """inverse(rgb_from_hed), computed in float64."""
    return torch.linalg.inv(rgb_from_hed(torch.float64, device)).to(dtype)


def rgb_to_hed_ref(rgb: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """P = max(rgb, 1e-6); OD = ln(P) / ln(1e-6); hed = OD @ hed_from_rgb (>= 0 if clamp)."""
    od = torch.log(torch.clamp(rgb, min=EPS)) / math.log(EPS)
    hed = od @ hed_from_rgb(rgb.dtype, rgb.device)
    return torch.clamp(hed, min=0) if clamp else hed


def hed_to_rgb_ref(hed: torch.Tensor) -> torch.Tensor:
    """rgb = exp(-(hed * -ln(1e-6)) @ rgb_from_hed), clipped to [0, 1]."""
    rgb = torch.exp(-(hed * LOG_ADJUST) @ rgb_from_hed(hed.dtype, hed.device))
    return torch.clamp(rgb, 0, 1)


def hed_augment_ref(rgb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Tellez Eqs. 5-7: hed' = alpha * hed + beta per stain channel, back to RGB in [0, 1].

    Args:
        rgb: (N, H, W, 3) floats in [0, 1].
        alpha, beta: (N, 3), one value per image and stain channel (H, E, DAB).
    """
    hed = rgb_to_hed_ref(rgb)
    return hed_to_rgb_ref(hed * alpha[:, None, None, :] + beta[:, None, None, :])
