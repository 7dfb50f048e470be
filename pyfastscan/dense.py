"""Dense scanning: geometry of a padding-free patch classifier and its conversion.

    dense = pyfastscan.to_dense(model, alpha=2)          # plan="minimal" (default) or "paper"
    heat = dense(roi)                                    # == patch loop at stride S_p / alpha

DESIGN.md 2.2 (the invariant) and 2.3 (the plans). The model is flattened into a list of
layers; every layer is classified as "spatial" (Conv2d, MaxPool2d, AvgPool2d: kernel,
stride, dilation), "pointwise" (activations, Softmax over channels) or removed (Dropout,
Identity; BatchNorm2d is folded into the preceding convolution), and a Flatten + Linear
head becomes the equivalent convolution.
"""
import copy
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .errors import InvalidArgumentError
from .nn import AnchConv2d, AnchPool2d

POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)
REMOVED = (nn.Dropout, nn.Dropout2d, nn.Identity)


@dataclass(frozen=True)
class Geometry:
    """Scan geometry of a (dense) patch classifier, in input pixels.

    Attributes:
        patch: L_p, the receptive field of one output (the patch side).
        stride: S_p, the total stride of the original network.
        alpha: dense factor; outputs are ``step = stride // alpha`` apart.
    """

    patch: int
    stride: int
    alpha: int = 1

    @property
    def step(self) -> int:
        """S_p' = S_p / alpha: distance between neighbouring outputs."""
        return self.stride // self.alpha

    def input_side(self, output_side: int) -> int:
        """Input side whose dense map has ``output_side`` outputs: L_p + (n - 1) * S_p'.
        For n = alpha * L_m this is Eq. 1 of DESIGN.md 2.2."""
        return self.patch + (output_side - 1) * self.step

    def output_side(self, input_side: int) -> int:
        """Outputs along an input side: (L - L_p) // S_p' + 1, 0 when L < L_p."""
        return 0 if input_side < self.patch else (input_side - self.patch) // self.step + 1


def _square(value, attr, pos):
    v = (value, value) if isinstance(value, int) else tuple(value)
    if v[0] != v[1]:
        raise InvalidArgumentError(f"layer {pos} has non-square {attr}={v}; "
                                   "only square kernels, strides and dilations are supported")
    return v[0]


@dataclass
class _Layer:
    module: nn.Module
    kind: str  # "conv", "max", "avg", "pointwise"
    kernel: int = 1
    stride: int = 1
    dilation: int = 1


def _leaves(model: nn.Module):
    if isinstance(model, nn.Sequential):
        for child in model:
            yield from _leaves(child)
    else:
        yield model


def _flatten(model: nn.Module) -> List[_Layer]:
    """Normalised layer list: BatchNorm folded, Dropout/Identity dropped, Linear head as conv."""
    leaves = list(_leaves(model))
    out: List[_Layer] = []
    channels: Optional[int] = None
    head_started = False
    for i, m in enumerate(leaves):
        pos = f"{i} ({type(m).__name__})"
        if isinstance(m, REMOVED):
            continue
        if isinstance(m, nn.Conv2d):
            if head_started:
                raise InvalidArgumentError(f"layer {pos}: a convolution after Flatten is not supported")
            if m.groups != 1:
                raise InvalidArgumentError(f"layer {pos} has groups={m.groups}; only groups=1 is supported")
            if isinstance(m.padding, str) or any(p != 0 for p in m.padding):
                raise InvalidArgumentError(f"layer {pos} has padding={m.padding!r}; dense scanning needs "
                                           "padding-free networks (padding makes a patch's output depend on "
                                           "where the patch lies)")
            conv = copy.deepcopy(m)
            out.append(_Layer(conv, "conv", _square(m.kernel_size, "kernel_size", pos),
                              _square(m.stride, "stride", pos), _square(m.dilation, "dilation", pos)))
            channels = m.out_channels
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            pad = m.padding if isinstance(m.padding, int) else max(m.padding)
            if pad != 0 or m.ceil_mode:
                raise InvalidArgumentError(f"layer {pos} has padding={m.padding!r}, ceil_mode={m.ceil_mode}; "
                                           "pooling must have padding 0 and ceil_mode False")
            if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
                raise InvalidArgumentError(f"layer {pos} has divisor_override; not supported")
            if isinstance(m, nn.MaxPool2d) and m.return_indices:
                raise InvalidArgumentError(f"layer {pos} returns indices; not supported")
            stride = m.stride if m.stride is not None else m.kernel_size  # AvgPool2d's default
            out.append(_Layer(m, "max" if isinstance(m, nn.MaxPool2d) else "avg",
                              _square(m.kernel_size, "kernel_size", pos), _square(stride, "stride", pos),
                              _square(getattr(m, "dilation", 1), "dilation", pos)))
        elif isinstance(m, nn.BatchNorm2d):
            if m.training or not m.track_running_stats:
                raise InvalidArgumentError(f"layer {pos} is in training mode (or has no running statistics); "
                                           "call model.eval() before to_dense")
            if not out or out[-1].kind != "conv":
                raise InvalidArgumentError(f"layer {pos}: BatchNorm2d must follow a Conv2d directly to be folded")
            _fold_bn(out[-1].module, m)
        elif isinstance(m, POINTWISE) or (isinstance(m, nn.Softmax) and m.dim in (1, -3)):
            out.append(_Layer(copy.deepcopy(m), "pointwise"))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1 or channels is None:
                raise InvalidArgumentError(f"layer {pos}: only Flatten(1, -1) after convolutions is supported")
            head_started = True
        elif isinstance(m, nn.Linear):
            if not head_started:
                raise InvalidArgumentError(f"layer {pos}: Linear must come after Flatten")
            conv = _linear_as_conv(m, channels, pos)
            out.append(_Layer(conv, "conv", conv.kernel_size[0], 1, 1))
            channels = m.out_features
        else:
            raise InvalidArgumentError(f"unsupported layer at position {pos}: {m!r}")
    if not any(layer.kind in ("conv", "max", "avg") for layer in out):
        raise InvalidArgumentError("the model has no convolution or pooling layer")
    return out


def _linear_as_conv(m: nn.Linear, channels: int, pos: str) -> nn.Conv2d:
    """The convolution equal to Flatten + Linear on a (channels, k, k) feature map."""
    area, rem = divmod(m.in_features, channels)
    k = math.isqrt(area)
    if rem or k * k != area:
        raise InvalidArgumentError(f"layer {pos}: Linear in_features={m.in_features} is not {channels} channels "
                                   "times a square feature map")
    conv = nn.Conv2d(channels, m.out_features, k, bias=m.bias is not None).to(m.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(m.weight.reshape(m.out_features, channels, k, k))  # Flatten is channel-major
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        new_bias = (bias * scale + shift).to(conv.weight.dtype)
        conv.bias = nn.Parameter(new_bias)


def _geometry_of(layers: List[_Layer]) -> Geometry:
    patch, stride = 1, 1
    for layer in layers:
        patch += (layer.kernel - 1) * layer.dilation * stride
        stride *= layer.stride
    return Geometry(patch, stride)


def geometry(model: nn.Module) -> Geometry:
    """Patch size (receptive field) and total stride of a padding-free patch classifier,
    derived by walking its layers. Raises InvalidArgumentError for layers it cannot reason
    about (padding, groups, unknown modules), naming the layer and its position."""
    return _geometry_of(_flatten(model))


class DenseModel(nn.Module):
    """The dense scanner returned by :func:`to_dense`; ``geometry`` documents its map.

    Input (N, C, H, W) with H, W >= geometry.patch; output (N, K, Ho, Wo) with
    Ho = geometry.output_side(H): output (i, j) is the patch classifier applied to the
    patch whose top-left corner is (i * step, j * step).
    """

    def __init__(self, layers: nn.Sequential, geometry: Geometry, plan: str):
        super().__init__()
        self.layers = layers
        self.geometry = geometry
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.geometry.patch:
            raise InvalidArgumentError(f"input must be (N, C, H, W) with H, W >= the patch size "
                                       f"{self.geometry.patch}, got {tuple(x.shape)}")
        out = self.layers(x)
        expected = tuple(self.geometry.output_side(s) for s in x.shape[-2:])
        if tuple(out.shape[-2:]) != expected:  # cannot happen for a correct plan: fail loudly
            raise RuntimeError(f"dense map {tuple(out.shape[-2:])} != geometry {expected} ({self.plan} plan)")
        return out

    def extra_repr(self) -> str:
        g = self.geometry
        return f"patch={g.patch}, stride={g.stride}, alpha={g.alpha}, step={g.step}, plan={self.plan!r}"


def _spatial(layer: _Layer, stride: int, dilation: int) -> nn.Module:
    """The layer with a new stride and dilation (an ordinary strided, dilated op)."""
    k = layer.kernel
    if layer.kind == "conv":
        m = layer.module
        m.stride, m.dilation = (stride, stride), (dilation, dilation)
        return m
    if layer.kind == "max":
        return nn.MaxPool2d(k, stride, dilation=dilation)
    if dilation == 1:
        return nn.AvgPool2d(k, stride)
    return AnchPool2d(k, anchor_stride=stride, operating_distance=1, dilation=dilation, mode="avg")


def _anchor(layer: _Layer, s_a: int, d_a: int, dilation: int) -> nn.Module:
    if layer.kind == "conv":
        return AnchConv2d.from_conv(layer.module, anchor_stride=s_a, operating_distance=d_a, dilation=dilation)
    return AnchPool2d(layer.kernel, anchor_stride=s_a, operating_distance=d_a, dilation=dilation, mode=layer.kind)


def _plan_minimal(layers: List[_Layer], delta: int) -> List[nn.Module]:
    modules, c_prev, sigma_prev = [], 1, 1
    for layer in layers:
        if layer.kind == "pointwise":
            modules.append(layer.module)
            continue
        c = c_prev * layer.stride
        sigma = math.gcd(c, delta)
        modules.append(_spatial(layer, sigma // sigma_prev, layer.dilation * c_prev // sigma_prev))
        c_prev, sigma_prev = c, sigma
    return modules


def _plan_paper(layers: List[_Layer], stride: int, alpha: int) -> List[nn.Module]:
    modules, c_prev, reconstructed = [], 1, alpha == 1
    for pos, layer in enumerate(layers):
        if layer.kind == "pointwise":
            modules.append(layer.module)
            continue
        s = layer.stride
        if reconstructed:
            modules.append(_anchor(layer, s * alpha, alpha, alpha * layer.dilation))
        else:
            delta = stride // (alpha * c_prev)  # phase spacing in units of the current feature
            if delta % s == 0:
                modules.append(layer.module if layer.kind == "conv" else _spatial(layer, s, layer.dilation))
            else:
                if stride % (alpha * c_prev) or delta != 1:
                    raise InvalidArgumentError(
                        f"plan='paper' is undefined here: at the reconstruction layer (position {pos}) the phase "
                        f"spacing is {stride / (alpha * c_prev):g} features, not 1; use plan='minimal'")
                if s < alpha:
                    raise InvalidArgumentError(
                        f"plan='paper' needs anchor_stride >= operating_distance at the reconstruction layer "
                        f"(position {pos}: stride {s} < alpha {alpha}); use plan='minimal'")
                modules.append(_anchor(layer, s, alpha, layer.dilation))
                reconstructed = True
        c_prev *= s
    return modules


def to_dense(model: nn.Module, alpha: int = 1, plan: str = "minimal") -> DenseModel:
    """Convert a padding-free patch classifier into a dense scanner (DESIGN.md 2.2-2.3).

    Args:
        model: nn.Sequential (possibly nested) of the layers listed in the module docstring.
            It is not modified; the dense model holds copies of its parameters.
        alpha: dense factor; must divide the network's stride S_p. The map is alpha times
            denser than the network's own stride (outputs S_p / alpha px apart).
        plan: "minimal" (every layer computes exactly the positions the output needs) or
            "paper" (Fast ScanNet's anchor-layer schedule). Both give the same output.
    Returns:
        DenseModel with ``.geometry`` (patch, stride, alpha, input_side(), output_side()).

    Example:
        >>> from pyfastscan.models import vgg16_fcn
        >>> dense = to_dense(vgg16_fcn(width=1 / 16), alpha=2)
        >>> dense.geometry.patch, dense.geometry.step, dense.geometry.input_side(4)
        (244, 16, 292)
    """
    if plan not in ("minimal", "paper"):
        raise InvalidArgumentError(f"plan must be 'minimal' or 'paper', got {plan!r}")
    layers = _flatten(model)
    geo = _geometry_of(layers)
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 1 or geo.stride % alpha:
        raise InvalidArgumentError(f"alpha must be a positive integer dividing the network's stride "
                                   f"{geo.stride}, got {alpha!r}")
    geo = Geometry(geo.patch, geo.stride, alpha)
    modules = _plan_minimal(layers, geo.step) if plan == "minimal" else _plan_paper(layers, geo.stride, alpha)
    dense = DenseModel(nn.Sequential(*modules), geo, plan)
    param = next(model.parameters(), None)
    return dense.to(param.dtype) if param is not None else dense
