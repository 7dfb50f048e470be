"""A padding-free residual network: ResNet's blocks without padding, scanned densely.

Every 3x3 convolution is valid (no padding), so each block's skip path is cropped to the
main path's size: a plain block crops 2 px per side; a strided block crops 3 px and takes
every other pixel with a 1x1 stride-2 convolution, which lands each skip position on the
centre of the main path's receptive field. The dense-equals-patch-based invariant holds
(DESIGN.md 2.2), so ``to_dense`` converts it exactly.
"""
from torch import nn


class ValidBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the cropped skip, then ReLU. With ``stride`` 2 the
    first convolution is strided and the skip is a 1x1 stride-2 convolution + BN of the
    input cropped by 3 px; output side (n - 5) // 2. With stride 1: output side n - 4."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.crop = 2 if stride == 1 else 3
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        c = self.crop
        skip = x[:, :, c:-c, c:-c]
        if self.downsample is not None:
            skip = self.downsample(skip)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + skip)


def residual_fcn(num_classes: int = 2, width: int = 32) -> nn.Module:
    """Padding-free ResNet-like patch classifier: a 3x3 stem, a 2x2 max pool, five
    :class:`ValidBlock` (widths w, 2w, 2w, 4w, 4w; the 2nd and 4th strided), a 3x3
    convolution and a 1x1 classifier. Stride 8; ``pyfastscan.geometry`` gives its patch.

    Args:
        num_classes: output channels.
        width: w, the first block's channels.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        ValidBlock(w, w), ValidBlock(w, 2 * w, 2), ValidBlock(2 * w, 2 * w), ValidBlock(2 * w, 4 * w, 2),
        ValidBlock(4 * w, 4 * w),
        nn.Conv2d(4 * w, 4 * w, 3), nn.ReLU(), nn.Conv2d(4 * w, num_classes, 1))
