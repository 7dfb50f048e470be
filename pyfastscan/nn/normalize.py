"""Normalize: per-channel (x - mean) / std, a layer :func:`pyfastscan.to_dense` folds exactly."""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InvalidArgumentError


def check_mean_std(mean, std) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) as tuples of finite floats of one nonzero length, std > 0."""
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"normalize must be (mean, std), sequences of one number per channel, "
                                   f"got mean {mean!r}, std {std!r}") from None
    if not mean or len(mean) != len(std):
        raise InvalidArgumentError(f"normalize: mean {mean} and std {std} must have the same, nonzero length")
    if not all(math.isfinite(v) for v in mean + std) or not all(s > 0 for s in std):
        raise InvalidArgumentError(f"normalize: mean must be finite and std positive, got mean {mean}, std {std}")
    return mean, std


class Normalize(nn.Module):
    """out[:, c] = (x[:, c] - mean[c]) / std[c] on an (N, C, ...) input.

    A pointwise layer; ``to_dense`` folds it into the convolutions that consume it
    (w' = w / std, b' = b - sum w * mean / std: exact with no padding).

    Example:
        >>> norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        >>> norm(torch.ones(1, 3, 2, 2))[0, :, 0, 0]
        tensor([2., 2., 2.])
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: Optional[torch.dtype] = None):
        super().__init__()
        mean, std = check_mean_std(mean, std)
        dtype = dtype or torch.get_default_dtype()  # float64 keeps the given values exactly
        self.register_buffer("mean", torch.tensor(mean, dtype=dtype))
        self.register_buffer("std", torch.tensor(std, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
