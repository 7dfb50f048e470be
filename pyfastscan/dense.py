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
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .nn import AnchConv2d, AnchPool2d
from .ops import AnchorAxis

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


PRECISIONS = ("fp32", "bf16")


class DenseModel(nn.Module):
    """The dense scanner returned by :func:`to_dense`; ``geometry`` documents its map.

    Input (N, C, H, W) with H, W >= geometry.patch; output (N, K, Ho, Wo) with
    Ho = geometry.output_side(H): output (i, j) is the patch classifier applied to the
    patch whose top-left corner is (i * step, j * step). With ``precision="bf16"`` the
    input is cast to bfloat16 (channels_last) and the map is returned as float32.
    Parameters are frozen (requires_grad False): this is an inference module.
    """

    def __init__(self, layers: nn.Sequential, geometry: Geometry, plan: str, precision: str = "fp32",
                 group: int = 1):
        super().__init__()
        self.layers = layers
        self.geometry = geometry
        self.plan = plan
        self.precision = precision
        # The paper plan with an overlapping reconstruction layer (s_a < d_a) yields whole
        # groups of `group` outputs only; forward pads the input up to a whole group and crops.
        self.group = group
        self._run = layers

    def compile(self, **kwargs) -> "DenseModel":
        """torch.compile the layers (kwargs go to torch.compile); returns self."""
        self._run = torch.compile(self.layers, **kwargs)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or min(x.shape[-2:]) < g.patch:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidArgumentError(f"input must be (N, C, H, W) with H, W >= the patch size {g.patch}, "
                                       f"got {shape}")
        expected = tuple(g.output_side(s) for s in x.shape[-2:])
        whole = tuple(-(-n // self.group) * self.group for n in expected)
        if whole != expected:
            pad = [g.input_side(n) - s for n, s in zip(whole, x.shape[-2:])]
            x = F.pad(x, (0, pad[1], 0, pad[0]))
        if self.precision == "bf16":
            x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out = self._run(x)[..., :expected[0], :expected[1]]
        if tuple(out.shape[-2:]) != expected:  # cannot happen for a correct plan: fail loudly
            raise RuntimeError(f"dense map {tuple(out.shape[-2:])} != geometry {expected} ({self.plan} plan)")
        return out.float() if self.precision == "bf16" else out

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype to give forward: the parameters' (float32 for bf16, cast inside forward)."""
        param = next(self.parameters(), None)
        return torch.float32 if param is None or self.precision == "bf16" else param.dtype

    def _walk(self, side: int):
        """(module, output side, output channels) of every layer for a side x side input, after the padding forward adds to reach whole groups; first the input itself
        as (None, padded side, input channels)."""
        g = self.geometry
        out = g.output_side(side)
        whole = -(-out // self.group) * self.group
        n = g.input_side(whole) if whole != out else side  # forward pads to whole groups
        first = next((m for m in self.layers if isinstance(m, (nn.Conv2d, AnchConv2d))), None)
        c = first.weight.shape[1] * first.groups if first is not None else 3
        yield None, n, c
        for m in self.layers:
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k, s, d = (_first(getattr(m, a, 1)) for a in ("kernel_size", "stride", "dilation"))
                n = (n - d * (k - 1) - 1) // s + 1
            elif isinstance(m, (AnchConv2d, AnchPool2d)):
                k = m.weight.shape[-1] if isinstance(m, AnchConv2d) else _first(m.kernel_size)
                n = AnchorAxis(k, _first(m.dilation), _first(m.anchor_stride), _first(m.operating_distance)).out_len(n)
            if isinstance(m, (nn.Conv2d, AnchConv2d)):
                c = m.weight.shape[0]
            yield m, n, c

    def multiply_adds(self, side: int) -> int:
        """Convolution multiply-adds of one forward pass on a side x side input (per image),
        counted from the layers' shapes: the cost model the benchmarks compare against."""
        return sum(n * n * m.weight[0].numel() * m.weight.shape[0]
                   for m, n, _ in self._walk(side) if isinstance(m, (nn.Conv2d, AnchConv2d)))

    def activation_bytes(self, side: int) -> int:
        """Peak bytes of activations held at once in one forward pass on a side x side
        input (per image): the largest input + output pair of a layer, in the
        precision the layers run in. Used to choose the ROI size that fits a memory budget."""
        param = next(self.parameters(), None)
        item = 2 if self.precision == "bf16" else (param.element_size() if param is not None else 4)
        sizes = [n * n * c for _, n, c in self._walk(side)]
        return item * max(a + b for a, b in zip(sizes, sizes[1:] or [0]))

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"patch={g.patch}, stride={g.stride}, alpha={g.alpha}, step={g.step}, plan={self.plan!r}, "
                f"precision={self.precision!r}")


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


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


def _plan_paper(layers: List[_Layer], stride: int, alpha: int) -> Tuple[List[nn.Module], int]:
    """Modules of the Fast ScanNet schedule, and the output group size forward must round
    up to (alpha when the reconstruction layer overlaps its groups: stride < alpha)."""
    modules, c_prev, reconstructed, group = [], 1, alpha == 1, 1
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
                modules.append(_anchor(layer, s, alpha, layer.dilation))
                reconstructed, group = True, (alpha if s < alpha else 1)
        c_prev *= s
    return modules, group


def to_dense(model: nn.Module, alpha: int = 1, plan: str = "minimal", precision: str = "fp32",
             compile: bool = False) -> DenseModel:
    """Convert a padding-free patch classifier into a dense scanner (DESIGN.md 2.2-2.3).

    Args:
        model: nn.Sequential (possibly nested) of the layers listed in the module docstring.
            It is not modified; the dense model holds frozen copies of its parameters.
        alpha: dense factor; must divide the network's stride S_p. The map is alpha times
            denser than the network's own stride (outputs S_p / alpha px apart).
        plan: "minimal" (every layer computes exactly the positions the output needs) or
            "paper" (Fast ScanNet's anchor-layer schedule). Both give the same output.
        precision: "fp32" (the model's own dtype; the reference path) or "bf16" (bfloat16
            weights and activations in channels_last, float32 accumulation inside each
            convolution, as bfloat16 autocast runs them; 3-4x faster on AMX CPUs; the map is
            returned as float32).
        compile: torch.compile the layers (first call compiles; results stay within the
            precision's tolerance).
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
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    layers = _flatten(model)
    geo = _geometry_of(layers)
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 1 or geo.stride % alpha:
        raise InvalidArgumentError(f"alpha must be a positive integer dividing the network's stride "
                                   f"{geo.stride}, got {alpha!r}")
    geo = Geometry(geo.patch, geo.stride, alpha)
    if plan == "minimal":
        modules, group = _plan_minimal(layers, geo.step), 1
    else:
        modules, group = _plan_paper(layers, geo.stride, alpha)
    dense = DenseModel(nn.Sequential(*modules), geo, plan, precision, group)
    param = next(model.parameters(), None)
    if precision == "bf16":
        dense = dense.to(torch.bfloat16, memory_format=torch.channels_last)
    elif param is not None:
        dense = dense.to(param.dtype)
    dense.requires_grad_(False).eval()
    return dense.compile() if compile else dense
