"""HEDAugment: Tellez et al.'s H&E stain augmentation as a module for training pipelines."""
from typing import Optional

import torch
from torch import nn

from ..ops.stain import hed_augment, sample_hed_params


class HEDAugment(nn.Module):
    """Random H&E stain augmentation, new parameters per image on every call.

    alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-sigma, sigma) per image and stain channel
    (:func:`pyfastscan.ops.sample_hed_params`), applied by the fused
    :func:`pyfastscan.ops.hed_augment`. Pass a ``generator`` for reproducible draws.

    Example:
        >>> aug = HEDAugment(sigma=0.05, generator=torch.Generator().manual_seed(0))
        >>> aug(torch.zeros(8, 3, 64, 64, dtype=torch.uint8)).shape
        torch.Size([8, 3, 64, 64])
    """

    def __init__(self, sigma: float = 0.05, *, channels_last: bool = False, backend: str = "auto",
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        sample_hed_params(0, sigma)  # validates sigma now, not at the first batch
        self.sigma, self.channels_last, self.backend, self.generator = sigma, channels_last, backend, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 4 else 1
        alpha, beta = sample_hed_params(n, self.sigma, self.generator)
        return hed_augment(x, alpha, beta, channels_last=self.channels_last, backend=self.backend)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, channels_last={self.channels_last}, backend={self.backend!r}"
