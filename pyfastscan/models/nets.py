"""The two networks of the seed papers, as padding-free patch classifiers."""
from collections import OrderedDict

from torch import nn

from ..validate import POSITIVE, check

# VGG16's convolution widths, "M" = 2x2 max pooling with stride 2.
_VGG16 = [(1, 64), (1, 64), "M", (2, 128), (2, 128), "M", (3, 256), (3, 256), (3, 256), "M",
          (4, 512), (4, 512), (4, 512), "M", (5, 512), (5, 512), (5, 512), "M"]


def vgg16_fcn(num_classes: int = 2, *, width: float = 1.0) -> nn.Sequential:
    """Fast ScanNet's network (Lin et al. 2019, Table I): VGG16 convolutions without
    padding, five 2x2 max pools, then conv6 2x2 -> 1024, conv7 1x1 -> 1024, conv8 1x1 ->
    num_classes, ReLU between. Patch 244 px, stride 32.

    Layers are named conv1_1 .. conv5_3, pool1 .. pool5, conv6 .. conv8 (see load_weights).

    Args:
        num_classes: output channels of conv8.
        width: multiplies every channel count (1.0 is the paper's network; tests use
            narrow copies, which keep Table I's geometry).
    """
    check("num_classes", num_classes)
    layers = OrderedDict()
    in_ch, idx = 3, {}
    pool = 0
    for item in _VGG16:
        if item == "M":
            pool += 1
            layers[f"pool{pool}"] = nn.MaxPool2d(2, 2)
            continue
        block, ch = item
        ch = max(1, round(ch * width))
        idx[block] = idx.get(block, 0) + 1
        name = f"{block}_{idx[block]}"
        layers[f"conv{name}"] = nn.Conv2d(in_ch, ch, 3)
        layers[f"relu{name}"] = nn.ReLU(inplace=True)
        in_ch = ch
    fc = max(1, round(1024 * width))
    layers["conv6"] = nn.Conv2d(in_ch, fc, 2)
    layers["relu6"] = nn.ReLU(inplace=True)
    layers["conv7"] = nn.Conv2d(fc, fc, 1)
    layers["relu7"] = nn.ReLU(inplace=True)
    layers["conv8"] = nn.Conv2d(fc, num_classes, 1)
    return nn.Sequential(layers)


def tellez_cnn(num_classes: int = 2, *, gamma: float = 0.6) -> nn.Sequential:
    """The distilled mitosis detector of Tellez et al. 2018 (Table II): eight 3x3
    convolutions with 32, 32, 64, 64, 128, 128, 256, 256 filters times gamma (the 2nd and
    4th with stride 2), LeakyReLU after each, a 14x14 convolution with 512*gamma filters,
    dropout, and a 1x1 convolution to num_classes.

    Stride 4. The paper feeds 100 px patches; the receptive field is 97 px, so the last 3
    rows and columns of such a patch do not change its output (``geometry`` reports 97).
    """
    check("num_classes", num_classes)
    check("gamma", gamma, POSITIVE)
    widths = [max(1, round(w * gamma)) for w in (32, 32, 64, 64, 128, 128, 256, 256)]
    layers = OrderedDict()
    in_ch = 3
    for i, w in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(in_ch, w, 3, stride=2 if i in (2, 4) else 1)
        layers[f"lrelu{i}"] = nn.LeakyReLU(0.01, inplace=True)
        in_ch = w
    fc = max(1, round(512 * gamma))
    layers["conv9"] = nn.Conv2d(in_ch, fc, 14)
    layers["lrelu9"] = nn.LeakyReLU(0.01, inplace=True)
    layers["dropout"] = nn.Dropout(0.5)
    layers["conv10"] = nn.Conv2d(fc, num_classes, 1)
    return nn.Sequential(layers)


def demo_cnn(num_classes: int = 2) -> nn.Sequential:
    """The bundled demo model's network (pyfastscan.demo_train): four 3x3 convolutions
    (16, 32, 32, 32 filters), ReLU, three 2x2 max pools, a 1x1 classifier. Padding-free:
    patch 38 px, stride 8; trained at 1 um/px."""
    check("num_classes", num_classes)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3), nn.ReLU(),
        nn.Conv2d(32, num_classes, 1))
