"""AnchPool2d and AnchConv2d modules (Fast ScanNet anchor layers)."""
import math

import torch
from torch import nn

from ..ops.anchor import anch_conv2d, anch_pool2d


class AnchPool2d(nn.Module):
    """Module form of :func:`pyfastscan.ops.anch_pool2d`.

    Example:
        >>> pool = AnchPool2d(2, anchor_stride=4, operating_distance=2, dilation=2)
        >>> pool(torch.randn(1, 8, 21, 21)).shape
        torch.Size([1, 8, 10, 10])
    """

    def __init__(self, kernel_size, *, anchor_stride, operating_distance, dilation=1, mode="max", backend="auto"):
        super().__init__()
        self.kernel_size, self.anchor_stride, self.operating_distance = kernel_size, anchor_stride, operating_distance
        self.dilation, self.mode, self.backend = dilation, mode, backend

    def forward(self, x):
        return anch_pool2d(x, self.kernel_size, anchor_stride=self.anchor_stride,
                           operating_distance=self.operating_distance, dilation=self.dilation, mode=self.mode,
                           backend=self.backend)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, anchor_stride={self.anchor_stride}, "
                f"operating_distance={self.operating_distance}, dilation={self.dilation}, mode={self.mode!r}")


class AnchConv2d(nn.Module):
    """Module form of :func:`pyfastscan.ops.anch_conv2d` (no padding, groups 1).

    Initialised like ``nn.Conv2d``; ``AnchConv2d.from_conv(conv, ...)`` reuses a trained
    convolution's parameters.

    Example:
        >>> conv = AnchConv2d(3, 8, 3, anchor_stride=2, operating_distance=2, dilation=2)
        >>> conv(torch.randn(1, 3, 12, 12)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, anchor_stride, operating_distance, dilation=1,
                 bias=True, backend="auto", device=None, dtype=None):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *k, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.anchor_stride, self.operating_distance, self.dilation = anchor_stride, operating_distance, dilation
        self.backend = backend
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(max(1, in_channels * k[0] * k[1]))
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, anchor_stride, operating_distance, dilation=1, backend="auto"):
        """An AnchConv2d sharing ``conv``'s weight and bias (same tensors, not copies)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.weight, m.bias = conv.weight, conv.bias
        m.anchor_stride, m.operating_distance, m.dilation, m.backend = (anchor_stride, operating_distance,
                                                                        dilation, backend)
        return m

    def forward(self, x):
        return anch_conv2d(x, self.weight, self.bias, anchor_stride=self.anchor_stride,
                           operating_distance=self.operating_distance, dilation=self.dilation, backend=self.backend)

    def extra_repr(self):
        o, c, ky, kx = self.weight.shape
        return (f"{c}, {o}, kernel_size=({ky}, {kx}), anchor_stride={self.anchor_stride}, "
                f"operating_distance={self.operating_distance}, dilation={self.dilation}, bias={self.bias is not None}")
