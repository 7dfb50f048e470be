"""Dense scanning: geometry of a padding-free patch classifier and its conversion.

    dense = pyfastscan.to_dense(model, alpha=2)          # plan="minimal" (default) or "paper"
    heat = dense(roi)                                    # == patch loop at stride S_p / alpha

DESIGN.md 2.2 (the invariant) and 2.3 (the plans). Two front ends, one set of rules:

* chains (nested nn.Sequential of torch.nn layers, or any traced model whose graph is a
  chain of layer modules) are flattened into a list of layers: "spatial" (Conv2d, also
  grouped and depthwise, MaxPool2d, AvgPool2d: kernel, stride, dilation), "pointwise"
  (activations, Softmax over channels, Normalize, BatchNorm2d not after a convolution)
  or removed (Dropout, Identity; BatchNorm2d folded into the preceding convolution,
  Normalize into the following one); a Flatten + Linear head becomes the equivalent
  convolution. Both plans apply.
* any other model torch.fx can trace (residual additions, channel concatenations,
  crops ``x[..., a:-b, a:-b]`` and strided crops ``x[..., a:-b:t, a:-b:t]``, functional
  activations) is converted node by node with the minimal plan. Every feature map lives
  on a lattice: with c its cumulative stride and K its extent, an input of n pixels gives
  (n - K) // c + 1 positions; position p of a patch's map covers the input pixels that
  start c * p later than position 0. The dense map of a node has spacing sigma = gcd(c,
  S_p / alpha) input pixels; a layer runs with stride sigma / sigma_in and dilation
  d * c_in / sigma_in, a crop of k positions at stride c drops k * c / sigma_in dense
  positions. Two maps can be added or concatenated when their strides and extents are
  equal (then their dense maps have the same size and positions p match).
"""
import copy
import math
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .nn import AnchConv2d, AnchPool2d, Normalize
from .nn.normalize import check_mean_std
from .ops import AnchorAxis

POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.SELU, nn.CELU,
             nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU)
REMOVED = (nn.Dropout, nn.Dropout2d, nn.Identity)
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL = "global pooling makes every output depend on the whole input, so no output is a patch's"


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


def _square(value, attr, where):
    v = (value, value) if isinstance(value, int) else tuple(value)
    if v[0] != v[1]:
        raise InvalidArgumentError(f"{where} has non-square {attr}={v}; "
                                   "only square kernels, strides and dilations are supported")
    return v[0]


def _spatial_spec(m: nn.Module, where: str) -> Tuple[str, int, int, int]:
    """(kind, kernel, stride, dilation) of a Conv2d, MaxPool2d or AvgPool2d, checked."""
    if isinstance(m, nn.Conv2d):
        pad = (0, 0) if m.padding == "valid" else m.padding
        if isinstance(pad, str) or any(p != 0 for p in pad):
            shown = pad if isinstance(pad, str) else (pad[0] if pad[0] == pad[1] else tuple(pad))
            raise InvalidArgumentError(f"{where} has padding {shown!r}; dense scanning needs padding-free networks "
                                       "(padding makes a patch's output depend on where the patch lies)")
        return ("conv", _square(m.kernel_size, "kernel_size", where), _square(m.stride, "stride", where),
                _square(m.dilation, "dilation", where))
    pad = m.padding if isinstance(m.padding, int) else max(m.padding)
    if pad != 0 or m.ceil_mode:
        raise InvalidArgumentError(f"{where} has padding={m.padding!r}, ceil_mode={m.ceil_mode}; "
                                   "pooling must have padding 0 and ceil_mode False")
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        raise InvalidArgumentError(f"{where} has divisor_override; not supported")
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise InvalidArgumentError(f"{where} returns indices; not supported")
    stride = m.stride if m.stride is not None else m.kernel_size  # AvgPool2d's default
    return ("max" if isinstance(m, nn.MaxPool2d) else "avg", _square(m.kernel_size, "kernel_size", where),
            _square(stride, "stride", where), _square(getattr(m, "dilation", 1), "dilation", where))


def _check_bn(m: nn.BatchNorm2d, where: str) -> None:
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise InvalidArgumentError(f"{where} is in training mode (or has no running statistics); "
                                   "call model.eval() before to_dense")


def _is_softmax(m: nn.Module, dims=(1, -3, None)) -> bool:
    return isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim in dims


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


def _is_layer(m: nn.Module) -> bool:
    """A torch.nn layer (or Normalize) the chain front end judges by its type."""
    return isinstance(m, Normalize) or (type(m).__module__.startswith("torch.nn.") and not any(m.children()))


def _flatten(model: nn.Module, normalize=None) -> List[_Layer]:
    """Normalised layer list: BatchNorm folded, Dropout/Identity dropped, Linear head as conv,
    Normalize (and ``normalize``, a (mean, std) pair applied first) folded into the
    convolution that follows it."""
    leaves = list(_leaves(model))
    out: List[_Layer] = []
    if normalize is not None:
        out.append(_Layer(Normalize(*normalize, dtype=torch.float64), "pointwise"))  # float64: the exact values fold
    channels: Optional[int] = None
    head_started = False
    for i, m in enumerate(leaves):
        pos = f"{i} ({type(m).__name__})"
        where = f"layer {pos}"
        if isinstance(m, REMOVED):
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            if head_started and isinstance(m, nn.Conv2d):
                raise InvalidArgumentError(f"layer {pos}: a convolution after Flatten is not supported")
            kind, k, s, d = _spatial_spec(m, where)
            out.append(_Layer(copy.deepcopy(m) if kind == "conv" else m, kind, k, s, d))
            channels = m.out_channels if kind == "conv" else channels
        elif isinstance(m, nn.BatchNorm2d):
            _check_bn(m, where)
            if out and out[-1].kind == "conv":
                _fold_bn(out[-1].module, m)
            else:  # an eval-mode BatchNorm is a per-channel affine map: pointwise
                out.append(_Layer(copy.deepcopy(m), "pointwise"))
        elif isinstance(m, Normalize):
            if head_started:
                raise InvalidArgumentError(f"layer {pos}: Normalize after Flatten is not supported")
            out.append(_Layer(copy.deepcopy(m), "pointwise"))
        elif isinstance(m, POINTWISE):
            out.append(_Layer(copy.deepcopy(m), "pointwise"))
        elif _is_softmax(m):
            out.append(_Layer(type(m)(dim=1), "pointwise"))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1 or channels is None:
                raise InvalidArgumentError(f"layer {pos}: only Flatten(1, -1) after convolutions is supported")
            head_started = True
        elif isinstance(m, nn.Linear):
            if not head_started:
                raise InvalidArgumentError(f"layer {pos}: Linear must come after Flatten")
            conv = _linear_as_conv(m, channels, where)
            out.append(_Layer(conv, "conv", conv.kernel_size[0], 1, 1))
            channels = m.out_features
        elif isinstance(m, GLOBAL_POOLS):
            raise InvalidArgumentError(f"{type(m).__name__} at position {i}: {_GLOBAL}")
        else:
            raise InvalidArgumentError(f"unsupported layer at position {pos}: {m!r}")
    if not any(layer.kind in ("conv", "max", "avg") for layer in out):
        raise InvalidArgumentError("the model has no convolution or pooling layer")
    return _fold_normalizations(out)


def _fold_normalizations(layers: List[_Layer]) -> List[_Layer]:
    """Each Normalize directly followed by a convolution folded into it (walking backwards,
    so consecutive Normalize layers fold one after the other)."""
    out: List[_Layer] = []
    for layer in reversed(layers):
        if isinstance(layer.module, Normalize) and out and out[-1].kind == "conv":
            _fold_normalize(out[-1].module, layer.module.mean.tolist(), layer.module.std.tolist(), "a convolution")
            continue
        out.append(layer)
    return out[::-1]


def _linear_as_conv(m: nn.Linear, channels: int, where: str) -> nn.Conv2d:
    """The convolution equal to Flatten + Linear on a (channels, k, k) feature map."""
    area, rem = divmod(m.in_features, channels)
    k = math.isqrt(area)
    if rem or k * k != area:
        raise InvalidArgumentError(f"{where}: Linear in_features={m.in_features} is not {channels} channels "
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


def _fold_normalize(conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float], where: str) -> None:
    """conv((x - mean) / std) as one convolution of x: w' = w / std, b' = b - sum w' * mean over
    (input channel, ky, kx), per input channel of each group, computed in float64. Exact
    (no padding: every tap reads a normalised pixel)."""
    w = conv.weight.detach().double()
    o, cg = w.shape[:2]
    g = conv.groups
    if cg * g != len(mean):
        raise InvalidArgumentError(f"{where} takes {cg * g} input channels, the normalisation has {len(mean)}")

    def per_weight(v):  # (o, cg, 1, 1): the value of each weight's input channel
        t = torch.tensor(list(v), dtype=torch.float64, device=w.device).reshape(g, 1, cg)
        return t.expand(g, o // g, cg).reshape(o, cg, 1, 1)

    w_new = w / per_weight(std)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(o, dtype=torch.float64)
    b_new = b - (w_new * per_weight(mean)).sum((1, 2, 3))
    conv.weight = nn.Parameter(w_new.to(conv.weight.dtype))
    conv.bias = nn.Parameter(b_new.to(conv.weight.dtype))


def _geometry_of(layers: List[_Layer]) -> Geometry:
    patch, stride = 1, 1
    for layer in layers:
        patch += (layer.kernel - 1) * layer.dilation * stride
        stride *= layer.stride
    return Geometry(patch, stride)


# ----------------------------------------------------------------------------- graphs (torch.fx)

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Normalize, AnchConv2d, AnchPool2d)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise InvalidArgumentError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); dense conversion "
            "needs a model torch.fx.symbolic_trace can trace (no Python control flow on tensor values); "
            "patch mode scans any model") from exc
    return fx.GraphModule(model, graph)


def _describe(node: fx.Node) -> str:
    """How errors name a node: "conv2 of layer1.0" for a module, "add at layer1.0.add" for
    a function or method called in layer1.0's forward."""
    if node.op == "call_module":
        *parent, last = node.target.split(".")
        return f"{last} of {'.'.join(parent)}" if parent else last
    fn = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    scope = list(stack.values())[-1][0] if stack else ""
    return f"{fn} at {scope + '.' if scope else ''}{node.name}"


@dataclass(frozen=True)
class _Lat:
    """The lattice of a feature map: an n-pixel input gives (n - extent) // c + 1 positions,
    c input pixels apart. ``flat``: after Flatten (a map of channels-major vectors)."""

    c: int
    extent: int
    ch: Optional[int]
    flat: bool = False


@dataclass(frozen=True)
class _Norm:
    """(src - mean) / std not yet computed: folded into the convolutions that read it,
    computed (once) for any other reader."""

    src: fx.Node
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def then(self, mean, std) -> "_Norm":
        """This normalisation followed by (y - mean) / std, as one."""
        return _Norm(self.src, tuple(m1 + m2 * s1 for m1, m2, s1 in zip(self.mean, mean, self.std)),
                     tuple(s1 * s2 for s1, s2 in zip(self.std, std)))


_BATCH = "batch size"  # the value of x.size(0)


@dataclass(frozen=True)
class _ShapeOf:
    """The value of x.shape or x.size()."""

    node: fx.Node


@dataclass(frozen=True)
class _Size:
    """size(node, axis) + k: a spatial size read in forward, for crops computed from sizes
    (x[..., d:d + y.shape[-2], ...]); resolved to constants at conversion."""

    node: fx.Node
    axis: int
    k: int = 0

_POINTWISE_FNS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
                  F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid,
                  torch.tanh, F.tanh, torch.exp, torch.clamp, torch.abs, torch.neg, operator.neg}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "clamp", "clamp_", "clamp_min",
                      "clamp_max", "abs", "neg", "contiguous"}
_BINARY_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
               operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_SOFTMAX_FNS = {F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log", torch.log_softmax: "log"}
_DROPOUT_FNS = {F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
_GLOBAL_FNS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.sum, torch.amax, torch.amin,
               torch.max, torch.min}
_GLOBAL_METHODS = {"mean", "sum", "amax", "amin", "max", "min"}
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg}
_CAT_FNS = {torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)}
_MAX_POOL_ARGS = (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
                  ("return_indices", False))
_AVG_POOL_ARGS = (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                  ("count_include_pad", True), ("divisor_override", None))


def _bind(node: fx.Node, names) -> dict:
    """Arguments after the input of a functional call, by name (defaults filled in)."""
    values = dict(names)
    for (name, _), v in zip(names, node.args[1:]):
        values[name] = v
    values.update(node.kwargs)
    return values


class _GraphConverter:
    """The dense graph of a traced model, node by node (module docstring)."""

    def __init__(self, model: nn.Module, normalize=None):
        self.model_name = type(model).__name__
        self.gm = _trace(model)
        self.modules = dict(self.gm.named_modules())
        self.normalize = normalize

    # -- the walk

    def run(self, delta: int) -> fx.GraphModule:
        """The dense GraphModule for output spacing ``delta`` = S_p / alpha (1 gives every
        pixel). Sets ``out`` (the output's lattice), ``ends_with_softmax`` and ``costs``."""
        self.delta = delta
        self.graph, self.root = fx.Graph(), nn.Module()
        self.env: Dict[fx.Node, object] = {}
        self.lat: Dict[fx.Node, _Lat] = {}
        self.info: Dict[fx.Node, tuple] = {}  # new node -> (extent, sigma, channels, multiply-adds per position)
        self.materialised: Dict[fx.Node, fx.Node] = {}
        self.folded_bn, self.softmax = set(), set()
        self.input, self.spatial, self.out = None, False, None
        nodes = list(self.gm.graph.nodes)
        live = self._live(nodes)
        for node in nodes:
            if node in live:
                self._visit(node)
        if not self.spatial:
            raise InvalidArgumentError("the model has no convolution or pooling layer")
        gm = fx.GraphModule(self.root, self.graph)
        index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n in self.info)}
        self.costs = [self.info[n] + (tuple(index[a] for a in n.all_input_nodes if a in index),) for n in index]
        return gm

    @staticmethod
    def _live(nodes):
        """Nodes the output depends on, and in-place calls (whose effect is not a use)."""
        live = set()
        for node in reversed(nodes):
            inplace = node.kwargs.get("inplace") is True or (isinstance(node.target, str) and
                                                              node.target.endswith("_"))
            if node.op == "output" or node in live or (inplace and node.op != "placeholder"):
                live.add(node)
                live.update(node.all_input_nodes)
        return live

    def geometry(self) -> Geometry:
        self.run(1)
        return Geometry(self.out.extent, self.out.c)

    def module_chain(self) -> Optional[List[nn.Module]]:
        """The modules in order when the graph is input -> modules -> output with nothing else."""
        chain, prev = [], None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                prev = node
            elif node.op == "call_module" and node.args == (prev,) and not node.kwargs and len(prev.users) == 1:
                chain.append(self.modules[node.target])
                prev = node
            elif node.op == "output" and node.args == (prev,) and len(prev.users) == 1:
                return chain
            else:
                return None
        return None

    def graph_node(self) -> str:
        """The first node that makes the graph not a chain of layer modules."""
        prev = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                prev = node
                continue
            if node.op != "call_module" or node.args != (prev,) or len(prev.users) != 1:
                return _describe(node) if node.op != "output" else f"the output of {self.model_name}"
            prev = node
        return self.model_name

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.input is not None:
                raise InvalidArgumentError(f"{self.model_name}.forward takes more than one input ({node.name}); "
                                           "dense conversion needs forward(x)")
            self.input = node
            new = self.graph.placeholder(node.name)
            ch = self._input_channels(node)
            self._set(node, new, _Lat(1, 1, ch))
            if self.normalize is not None:
                self.env[node] = _Norm(new, *self.normalize)
        elif node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                name = self._unique(node.target)
                self.root.register_buffer(name, value.detach().clone())
                value = self.graph.get_attr(name)
            self.env[node] = value
        elif node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node) or arg not in self.lat:
                raise InvalidArgumentError(f"{self.model_name}.forward returns {type(arg).__name__}; dense "
                                           "conversion needs one tensor output")
            self.graph.output(self._value(arg))
            self.out, self.ends_with_softmax = self.lat[arg], arg in self.softmax
        elif node.op == "call_module":
            self._module(node, self.modules[node.target])
        else:
            self._call(node)

    # -- values

    def _unique(self, target: str) -> str:
        base = target.replace(".", "_") or "m"
        name, i = base, 1
        while hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        return name

    def _set(self, node, new, lat: _Lat, macs: int = 0) -> None:
        self.env[node], self.lat[node] = new, lat
        self.info[new] = (lat.extent, math.gcd(lat.c, self.delta), lat.ch, macs)

    def _alias(self, node, x) -> None:
        self.env[node], self.lat[node] = self.env[x], self.lat[x]
        if x in self.softmax:
            self.softmax.add(node)

    def _value(self, n):
        """The dense graph's value for an argument of the original graph."""
        if not isinstance(n, fx.Node):
            return n
        v = self.env[n]
        if isinstance(v, _Norm):
            if n not in self.materialised:
                name = self._unique("normalize")
                self.root.add_module(name, Normalize(v.mean, v.std, dtype=torch.float64))
                new = self.graph.call_module(name, (v.src,))
                self.materialised[n] = new
                self.info[new] = self.info[v.src]
            return self.materialised[n]
        if isinstance(v, (str, _ShapeOf, _Size)):
            raise InvalidArgumentError(f"{_describe(n)} reads a tensor's size and passes it on: the dense model runs "
                                       "on larger inputs than the patch, so crops must be constants "
                                       "(x[..., a:-b, a:-b]) and reshapes x.flatten(1)")
        return v

    def _map(self, x, node: fx.Node) -> _Lat:
        if not isinstance(x, fx.Node) or x not in self.lat:
            raise InvalidArgumentError(f"{_describe(node)} takes {x!r} where a feature map was expected")
        return self.lat[x]

    def _input_channels(self, node) -> Optional[int]:
        for user in node.users:
            if user.op == "call_module" and isinstance(self.modules[user.target], nn.Conv2d):
                return self.modules[user.target].in_channels
        return len(self.normalize[0]) if self.normalize is not None else 3

    def _emit(self, node, module: nn.Module, x_new, lat: _Lat, macs: int = 0):
        name = self._unique(node.target if node.op == "call_module" else node.name)
        self.root.add_module(name, module)
        self._set(node, self.graph.call_module(name, (x_new,)), lat, macs)

    def _copy(self, node, lat: _Lat, **kwargs) -> None:
        """The node itself in the dense graph (a pointwise or joining op), kwargs replaced."""
        new = self.graph.node_copy(node, self._value)
        if kwargs:
            new.kwargs = {**new.kwargs, **kwargs}
        self._set(node, new, lat)

    # -- layers

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        where = _describe(node)
        if len(node.args) != 1 or node.kwargs:
            raise InvalidArgumentError(f"{where} ({type(m).__name__}) is called with {len(node.args)} arguments "
                                       f"and {len(node.kwargs)} keywords; only single-input layers are supported")
        x = node.args[0]
        lat = self._map(x, node)
        if isinstance(m, REMOVED):
            self._alias(node, x)
        elif isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            self._spatial(node, m, x, lat, where)
        elif isinstance(m, nn.BatchNorm2d):
            _check_bn(m, where)
            if node in self.folded_bn:
                self._alias(node, x)
            else:
                self._emit(node, copy.deepcopy(m), self._value(x), lat)
        elif isinstance(m, Normalize):
            if lat.flat:
                raise InvalidArgumentError(f"{where}: Normalize after Flatten is not supported")
            mean, std = m.mean.tolist(), m.std.tolist()
            src = self.env[x]
            self.env[node] = src.then(mean, std) if isinstance(src, _Norm) else _Norm(self._value(x), mean, std)
            self.lat[node] = lat
        elif isinstance(m, POINTWISE) or _is_softmax(m, (1, -1, None) if lat.flat else (1, -3, None)):
            softmax = isinstance(m, (nn.Softmax, nn.LogSoftmax))
            self._emit(node, type(m)(dim=1) if softmax else copy.deepcopy(m), self._value(x), lat)
            if isinstance(m, nn.Softmax):
                self.softmax.add(node)
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise InvalidArgumentError(f"{where}: only Flatten(1, -1) is supported, got "
                                           f"Flatten({m.start_dim}, {m.end_dim})")
            self._flatten(node, x, lat)
        elif isinstance(m, nn.Linear):
            self._linear(node, m, x, lat, where)
        elif isinstance(m, GLOBAL_POOLS):
            raise InvalidArgumentError(f"{type(m).__name__} at {node.target}: {_GLOBAL}")
        else:
            raise InvalidArgumentError(f"unsupported layer {type(m).__name__} at {node.target}: {m!r}")

    def _spatial(self, node, m, x, lat: _Lat, where: str) -> None:
        kind, k, s, d = _spatial_spec(m, where)
        if lat.flat:
            raise InvalidArgumentError(f"{where}: a convolution or pooling after Flatten is not supported")
        src = self.env[x]
        sig_in = math.gcd(lat.c, self.delta)
        c = lat.c * s
        stride, dilation = math.gcd(c, self.delta) // sig_in, d * lat.c // sig_in
        if kind == "conv":
            module = copy.deepcopy(m)
            if isinstance(src, _Norm):
                _fold_normalize(module, src.mean, src.std, where)
                src = src.src
            else:
                src = self._value(x)
            bn = self._following_bn(node)
            if bn is not None:
                _fold_bn(module, bn)
            module.stride, module.dilation = (stride, stride), (dilation, dilation)
            ch, macs = m.out_channels, module.weight.numel()
        else:
            module, src, ch, macs = _pool(kind, k, stride, dilation), self._value(x), lat.ch, 0
        self.spatial = True
        self._emit(node, module, src, _Lat(c, lat.extent + (k - 1) * d * lat.c, ch), macs)

    def _following_bn(self, node) -> Optional[nn.BatchNorm2d]:
        """The BatchNorm2d that is the convolution's only reader, to fold (checked eval)."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and users[0].args == (node,) and not users[0].kwargs:
            bn = self.modules[users[0].target]
            if isinstance(bn, nn.BatchNorm2d):
                _check_bn(bn, _describe(users[0]))
                self.folded_bn.add(users[0])
                return bn
        return None

    def _flatten(self, node, x, lat: _Lat) -> None:
        """Flatten(1) of a map: the dense graph keeps the map (a Linear after it becomes a
        convolution); of an already flat map: nothing."""
        self._alias(node, x)
        self.lat[node] = _Lat(lat.c, lat.extent, lat.ch, True)

    def _linear(self, node, m: nn.Linear, x, lat: _Lat, where: str) -> None:
        if not lat.flat:
            raise InvalidArgumentError(f"{where}: Linear on a feature map acts on its last (spatial) axis; only "
                                       "Flatten + Linear heads are supported")
        conv = _linear_as_conv(m, lat.ch, where)
        k = conv.kernel_size[0]
        sig = math.gcd(lat.c, self.delta)
        conv.dilation = (lat.c // sig, lat.c // sig)
        self._emit(node, conv, self._value(x), _Lat(lat.c, lat.extent + (k - 1) * lat.c, m.out_features, True),
                   conv.weight.numel())

    # -- functions and methods

    def _call(self, node: fx.Node) -> None:
        fn, where = node.target, _describe(node)
        method = node.op == "call_method"
        x = node.args[0] if node.args else None
        if fn is operator.getitem:
            return self._getitem(node, x, node.args[1], where)
        if fn is getattr and node.args[1] == "shape" or method and fn == "size":
            if method and (len(node.args) > 1 or "dim" in node.kwargs):  # x.size(dim)
                return self._size_index(node, x, node.args[1] if len(node.args) > 1 else node.kwargs["dim"], where)
            self._map(x, node)
            self.env[node] = _ShapeOf(x)
            return
        if fn in _SIZE_ARITHMETIC and not any(isinstance(a, fx.Node) and a in self.lat for a in node.args):
            return self._arithmetic(node, where)
        if (fn in _CAT_FNS) and not method:
            return self._cat(node, where)
        if fn in _BINARY_FNS or (method and fn in _BINARY_METHODS):
            return self._binary(node, where)
        lat = self._map(x, node)
        others = [a for a in node.all_input_nodes if a is not x]
        if fn in _POINTWISE_FNS or (method and fn in _POINTWISE_METHODS):
            if others:
                raise InvalidArgumentError(f"{where} takes more than one tensor; only elementwise ops with "
                                           "constants are supported")
            return self._copy(node, lat)
        if fn in _SOFTMAX_FNS or (method and fn in ("softmax", "log_softmax")):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim not in ((1, -1) if lat.flat else (1, -3)):
                raise InvalidArgumentError(f"{where} is a softmax over dim {dim}; only softmax over channels "
                                           "(dim=1) is pointwise")
            kind = _SOFTMAX_FNS.get(fn, "log" if fn == "log_softmax" else "softmax")
            self._set(node, self.graph.call_function(F.softmax if kind == "softmax" else F.log_softmax,
                                                     (self._value(x),), {"dim": 1}), lat)
            if kind == "softmax":
                self.softmax.add(node)
            return
        if fn in _DROPOUT_FNS:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training:
                raise InvalidArgumentError(f"{where} runs in training mode; call model.eval() before to_dense")
            return self._alias(node, x)
        if fn in (F.max_pool2d, F.avg_pool2d):
            a = _bind(node, _MAX_POOL_ARGS if fn is F.max_pool2d else _AVG_POOL_ARGS)
            if fn is F.max_pool2d:
                m = nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["return_indices"],
                                 a["ceil_mode"])
            else:
                m = nn.AvgPool2d(a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                 a["count_include_pad"], a["divisor_override"])
            return self._spatial(node, m, x, lat, where)
        if (fn is torch.flatten or method and fn == "flatten") and (
                node.args[1:] or node.kwargs.get("start_dim", 0)) in ((1,), 1) and \
                node.kwargs.get("end_dim", -1) == -1 and len(node.args) <= 2:
            return self._flatten(node, x, lat)
        if method and fn in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1 and \
                self.env.get(node.args[1]) is _BATCH:
            return self._flatten(node, x, lat)
        if fn in _GLOBAL_FNS or (method and fn in _GLOBAL_METHODS) or fn in (F.adaptive_avg_pool2d,):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            if fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d) or any(d in (None, 2, 3, -1, -2) for d in dims):
                raise InvalidArgumentError(f"{where}: {_GLOBAL}")
        raise InvalidArgumentError(f"unsupported operation {where} (args {node.args}); dense conversion knows "
                                   "convolutions, pooling, elementwise ops, crops x[..., a:-b, a:-b], additions, "
                                   "torch.cat over channels and Flatten + Linear heads")

    def _size_index(self, node, x, dim, where) -> None:
        lat = self._map(x, node)
        if not isinstance(dim, int):
            raise InvalidArgumentError(f"{where} reads the sizes {dim!r}; only one axis at a time is supported")
        axis = dim % (2 if lat.flat else 4)
        if axis == 0:
            self.env[node] = _BATCH
        elif axis == 1 and lat.ch is not None:
            self.env[node] = lat.ch
        elif axis >= 2:
            self.env[node] = _Size(x, axis)
        else:
            raise InvalidArgumentError(f"{where} reads the channel count of a map whose channels are unknown")

    def _gap(self, t1: fx.Node, t2: fx.Node, where: str) -> int:
        """size(t1) - size(t2) along an axis, when it is the same for every input size."""
        l1, l2 = self.lat[t1], self.lat[t2]
        if l1.c != l2.c or (l2.extent - l1.extent) % l1.c:
            raise InvalidArgumentError(f"{where} computes a crop from the sizes of maps whose sizes do not differ by "
                                       f"a constant (strides {l1.c} and {l2.c}); crop by constants "
                                       "(x[..., a:-b, a:-b])")
        return (l2.extent - l1.extent) // l1.c

    def _arithmetic(self, node, where) -> None:
        """Integer arithmetic on sizes read in forward: constants, or size + constant."""
        fn = node.target
        vals = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        sizes = [isinstance(v, _Size) for v in vals]
        if not any(sizes) and all(isinstance(v, int) for v in vals):
            self.env[node] = fn(*vals)
            return
        if len(vals) == 2 and all(isinstance(v, (int, _Size)) for v in vals):
            a, b = vals
            if fn in (operator.add, operator.sub) and isinstance(a, _Size) and isinstance(b, int):
                self.env[node] = _Size(a.node, a.axis, a.k + (b if fn is operator.add else -b))
                return
            if fn is operator.add and isinstance(a, int) and isinstance(b, _Size):
                self.env[node] = _Size(b.node, b.axis, b.k + a)
                return
            if fn is operator.sub and isinstance(a, _Size) and isinstance(b, _Size) and a.axis == b.axis:
                self.env[node] = self._gap(a.node, b.node, where) + a.k - b.k
                return
        raise InvalidArgumentError(f"{where} computes {fn.__name__} of sizes {vals}: crops may use constants and "
                                   "sizes plus constants (x[..., d:d + y.shape[-2], ...]) only")

    def _bounds(self, x, e: slice, axis: int, where: str) -> Tuple[int, int, int]:
        """(a, b, t) of a spatial slice of map x: keep positions a, a + t, ... up to b before the end."""
        def value(v):
            return self.env[v] if isinstance(v, fx.Node) else v

        start, stop, step = value(e.start), value(e.stop), value(e.step)
        if isinstance(stop, _Size):
            if stop.axis != axis:
                raise InvalidArgumentError(f"{where} slices axis {axis} up to a size of axis {stop.axis}")
            stop = stop.k - self._gap(x, stop.node, where) or None  # size(x) - gap + k, from the end
        a, t = start if start is not None else 0, step if step is not None else 1
        if not (isinstance(a, int) and isinstance(t, int) and (stop is None or isinstance(stop, int))) \
                or a < 0 or t < 1 or (stop is not None and stop >= 0):
            raise InvalidArgumentError(
                f"{where} slices the spatial axes with {e}: a crop must keep the positions from a to b before "
                "the end (x[..., a:-b] or x[..., a:], a >= 0, step >= 1), whatever the map's size")
        return a, 0 if stop is None else -stop, t

    def _getitem(self, node, x, idx, where) -> None:
        if isinstance(self.env.get(x), _ShapeOf):
            return self._size_index(node, self.env[x].node, idx, where)
        lat = self._map(x, node)
        if lat.flat:
            raise InvalidArgumentError(f"{where} indexes a flattened map; only crops of feature maps are supported")
        entries = list(idx) if isinstance(idx, tuple) else [idx]
        if Ellipsis in entries:
            i = entries.index(Ellipsis)
            entries[i:i + 1] = [slice(None)] * (5 - len(entries))
        entries += [slice(None)] * (4 - len(entries))
        if len(entries) != 4 or not all(isinstance(e, slice) for e in entries) or entries[0] != slice(None):
            raise InvalidArgumentError(f"{where} indexes with {idx!r}: only slices of channels and of the two "
                                       "spatial axes (crops x[..., a:-b, a:-b]) are supported")
        _, chan, rows, cols = entries
        if any(isinstance(v, fx.Node) for v in (chan.start, chan.stop, chan.step)):
            chan = slice(*(self.env[v] if isinstance(v, fx.Node) else v for v in (chan.start, chan.stop, chan.step)))
            if not all(v is None or isinstance(v, int) for v in (chan.start, chan.stop, chan.step)):
                raise InvalidArgumentError(f"{where} slices channels by sizes {chan}; use constants")
        a, b, t = self._bounds(x, rows, 2, where)
        if (a, b, t) != self._bounds(x, cols, 3, where):
            raise InvalidArgumentError(f"{where} crops rows {rows} and columns {cols} differently; only square "
                                       "crops are supported")
        ch = len(range(lat.ch)[chan]) if lat.ch is not None else None
        sig_in = math.gcd(lat.c, self.delta)
        c = lat.c * t
        sig = math.gcd(c, self.delta)
        if (a * lat.c) % sig_in or (b * lat.c) % sig_in:  # cannot happen: sigma divides c
            raise InvalidArgumentError(f"{where}: a crop of {a}, {b} positions at stride {lat.c} is not a whole "
                                       f"number of dense positions {sig_in} px apart")
        ad, bd, td = a * lat.c // sig_in, b * lat.c // sig_in, sig // sig_in
        dense = slice(ad or None, -bd if bd else None, td if td > 1 else None)
        new = self.graph.call_function(operator.getitem, (self._value(x), (slice(None), chan, dense, dense)))
        self._set(node, new, _Lat(c, lat.extent + (a + b) * lat.c, ch))

    def _join(self, node, maps: List[fx.Node], what: str, where: str) -> _Lat:
        """The common lattice of maps that are added (or concatenated), or why they differ."""
        lats = [self._map(m, node) for m in maps]
        first = lats[0]
        for other in lats[1:]:
            if other.flat != first.flat:
                raise InvalidArgumentError(f"{where}: {what} a flattened and an unflattened map")
            if other.c != first.c:
                raise InvalidArgumentError(
                    f"{where}: {what} maps of cumulative strides {first.c} and {other.c}; the skip path needs the "
                    "same stride (a strided crop x[..., a:-b:s, a:-b:s] or a strided 1x1 convolution)")
            if other.extent != first.extent:
                diff = abs(other.extent - first.extent)
                size = f"{diff // first.c}" if diff % first.c == 0 else f"{diff / first.c:g}"
                raise InvalidArgumentError(
                    f"{where}: the skip path is not cropped to the main path (sizes differ by {size} at stride "
                    f"{first.c}); crop the larger map (x[..., a:-b, a:-b]) so both cover the same positions")
        return first

    def _binary(self, node, where) -> None:
        maps = [a for a in node.args if isinstance(a, fx.Node) and a in self.lat]
        if not maps:
            raise InvalidArgumentError(f"{where} takes no feature map; only ops on feature maps are supported")
        for a in node.all_input_nodes:
            if a not in self.lat and isinstance(self.env.get(a), fx.Node):  # a constant tensor (get_attr)
                t = getattr(self.root, self.env[a].target)
                spatial_one = t.dim() >= 3 and tuple(t.shape[-2:]) == (1, 1) and not self.lat[maps[0]].flat
                if t.numel() != 1 and not spatial_one:
                    raise InvalidArgumentError(f"{where} combines a map with a constant of shape {tuple(t.shape)}; "
                                               "only scalars and per-channel (C, 1, 1) constants are supported")
        lat = self._join(node, maps, "adds", where) if len(maps) > 1 else self.lat[maps[0]]
        self._copy(node, lat)

    def _cat(self, node, where) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not tensors:
            raise InvalidArgumentError(f"{where} concatenates {tensors!r}; expected a list of maps")
        lat = self._join(node, list(tensors), "concatenates", where)
        if dim not in ((1, -1) if lat.flat else (1, -3)):
            raise InvalidArgumentError(f"{where} concatenates along dim {dim}; only channel concatenation "
                                       "(dim=1) is supported")
        chans = [self.lat[t].ch for t in tensors]
        ch = None if None in chans else sum(chans)
        new = self.graph.call_function(torch.cat, ([self._value(t) for t in tensors],), {"dim": 1})
        self._set(node, new, _Lat(lat.c, lat.extent, ch, lat.flat))


def _pool(kind: str, k: int, stride: int, dilation: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(k, stride, dilation=dilation)
    if dilation == 1:
        return nn.AvgPool2d(k, stride)
    return AnchPool2d(k, anchor_stride=stride, operating_distance=1, dilation=dilation, mode="avg")


def _front_end(model: nn.Module, normalize=None):
    """("chain", layers) or ("graph", converter): the chain front end for nested Sequentials
    of torch.nn layers and for traced models whose graph is a chain of layer modules."""
    if _is_layer(model) and not isinstance(model, nn.Sequential):
        model = nn.Sequential(model)
    if isinstance(model, nn.Sequential) and all(_is_layer(m) for m in _leaves(model)):
        return "chain", _flatten(model, normalize)
    converter = _GraphConverter(model, normalize)
    converter.run(1)  # checks every node
    chain = converter.module_chain()
    if chain is not None:
        return "chain", _flatten(nn.Sequential(*chain), normalize)
    return "graph", converter


def geometry(model: nn.Module) -> Geometry:
    """Patch size (receptive field) and total stride of a padding-free patch classifier,
    derived from its layers (or its torch.fx graph). Raises InvalidArgumentError for what
    it cannot reason about (padding, global pooling, unknown modules), naming the layer."""
    kind, front = _front_end(model)
    if kind == "chain":
        return _geometry_of(front)
    return Geometry(front.out.extent, front.out.c)


PRECISIONS = ("fp32", "bf16")
# fp32 on the CPU: the activations' memory layout. "auto" is channels_last unless
# convolutions with kernels of LARGE_KERNEL x LARGE_KERNEL or more do LARGE_KERNEL_SHARE of
# the work or more, or the layers hold anchor layers (their kernels take NCHW). Measured on
# an AMD EPYC (avx512f, no AMX), float32, two threads: channels_last ran VGG16-FCN
# 1.21-1.28x, the demo CNN and a small 4-pool CNN 1.9-2.4x and residual_fcn 1.23-1.28x
# faster, Tellez's CNN (one 14 x 14 dilated convolution doing 49-84% of its work, by alpha)
# 0.79-0.98x. A rule of the layers, not a timing: the map is the same in every run,
# process and Ray worker.
LAYOUTS = ("auto", "nchw", "channels_last")
LARGE_KERNEL = 7
LARGE_KERNEL_SHARE = 0.4  # Tellez's CNN at alpha 4: 49% of the work, channels_last 0.96x there

class DenseModel(nn.Module):
    """The dense scanner returned by :func:`to_dense`; ``geometry`` documents its map.

    Input (N, C, H, W) with H, W >= geometry.patch; output (N, K, Ho, Wo) with
    Ho = geometry.output_side(H): output (i, j) is the patch classifier applied to the
    patch whose top-left corner is (i * step, j * step). With ``precision="bf16"`` the
    input is cast to bfloat16 (channels_last) and the map is returned as float32. In
    float32 on the CPU, ``layout`` ("auto", "nchw" or "channels_last", :data:`LAYOUTS`) is
    the activations' memory layout; "auto" decides from the layers (:meth:`auto_layout`),
    ``layout_used`` and ``layout_reason`` say what ran and why. The layouts differ only in
    the order of each convolution's sums (within the fp32 bound).
    Parameters are frozen (requires_grad False): this is an inference module.
    ``layers`` is an nn.Sequential for chains, a torch.fx GraphModule for graphs.
    """

    def __init__(self, layers: nn.Module, geometry: Geometry, plan: str, precision: str = "fp32",
                 group: int = 1, ends_with_softmax: Optional[bool] = None, costs: Optional[list] = None):
        super().__init__()
        self.layers = layers
        self.geometry = geometry
        self.plan = plan
        self.precision = precision
        # The paper plan with an overlapping reconstruction layer (s_a < d_a) yields whole
        # groups of `group` outputs only; forward pads the input up to a whole group and crops.
        self.group = group
        if ends_with_softmax is None:
            ends_with_softmax = isinstance(layers, nn.Sequential) and len(layers) > 0 and \
                isinstance(layers[-1], nn.Softmax)
        self._ends_with_softmax = bool(ends_with_softmax)
        # Graphs: per node (extent, spacing, channels, multiply-adds per position, input nodes).
        self._costs = costs
        self.layout = "auto"

    @property
    def layout(self) -> str:
        return self.__dict__["_layout"]

    @layout.setter
    def layout(self, value: str) -> None:
        if value not in LAYOUTS:
            raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {value!r}")
        self.__dict__["_layout"] = value
        self.__dict__.pop("_layout_chosen", None)

    @property
    def layout_used(self) -> Optional[str]:
        """The layout the float32 CPU forward ran in ("nchw" / "channels_last"), None before
        the first such forward (bf16 always runs channels_last; other devices their own)."""
        chosen = self.__dict__.get("_layout_chosen")
        return None if chosen is None else chosen[0]

    @property
    def layout_reason(self) -> Optional[str]:
        chosen = self.__dict__.get("_layout_chosen")
        return None if chosen is None else chosen[1]

    def input_memory_format(self, device="cpu") -> torch.memory_format:
        """The layout forward runs its input in on ``device`` (channels_last for bf16 and for
        a channels_last float32 CPU model, see ``layout``): an input already in it, with
        whole images apart, is not copied."""
        param = next(self.parameters(), None)
        if self.precision == "bf16" or (torch.device(device).type == "cpu" and param is not None
                                         and param.dtype == torch.float32 and self._channels_last()):
            return torch.channels_last
        return torch.contiguous_format

    def _channels_last(self) -> bool:
        """Whether this float32 CPU forward runs in channels_last (see ``layout``)."""
        chosen = self.__dict__.get("_layout_chosen")
        if chosen is None:
            chosen = self.__dict__["_layout_chosen"] = \
                self.auto_layout() if self.layout == "auto" else (self.layout, "requested")
        return chosen[0] == "channels_last"

    def auto_layout(self) -> Tuple[str, str]:
        """("nchw" or "channels_last", why): what ``layout="auto"`` runs, from the layers
        alone (see :data:`LARGE_KERNEL`), their work counted for a map of 16 x 16 cells."""
        modules = list(self.layers.modules())
        if any(isinstance(m, (AnchConv2d, AnchPool2d)) for m in modules):
            return "nchw", "anchor layers (their kernels take NCHW)"
        large = [m for m in modules if isinstance(m, nn.Conv2d) and min(m.weight.shape[-2:]) >= LARGE_KERNEL]
        if not large:
            return "channels_last", f"no convolution kernel of {LARGE_KERNEL} x {LARGE_KERNEL} or more"
        if self._costs is not None:  # a graph: its nodes' costs are not per module
            return "nchw", f"a graph with a convolution kernel of {LARGE_KERNEL} x {LARGE_KERNEL} or more"
        work = {id(m): n * n * m.weight[0].numel() * m.weight.shape[0]
                for m, n, _ in self._walk(self.geometry.input_side(16)) if isinstance(m, nn.Conv2d)}
        share = sum(work.get(id(m), 0) for m in large) / max(1, sum(work.values()))
        if share >= LARGE_KERNEL_SHARE:
            return "nchw", (f"convolutions with kernels of {LARGE_KERNEL} x {LARGE_KERNEL} or more do "
                            f"{share:.0%} of the multiply-adds (>= {LARGE_KERNEL_SHARE:.0%})")
        return "channels_last", (f"convolutions with kernels of {LARGE_KERNEL} x {LARGE_KERNEL} or more do only "
                                 f"{share:.0%} of the multiply-adds (< {LARGE_KERNEL_SHARE:.0%})")

    @property
    def ends_with_softmax(self) -> bool:
        """True when the network's last op is a Softmax over channels (the map is probabilities)."""
        return self._ends_with_softmax

    def compile_layers(self, **kwargs) -> "DenseModel":
        """torch.compile the layers (kwargs go to torch.compile); returns self. The input
        checks and the crop stay eager. (``nn.Module.compile``, which compiles the whole
        forward, is left as PyTorch defines it.) The compiled callable is kept outside the
        module's registry, so the state dict holds each tensor once."""
        self.__dict__["_compiled"] = torch.compile(self.layers, **kwargs)
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
        elif x.device.type == "cpu" and x.dtype == torch.float32 and self._channels_last():
            # copied unless already channels_last with whole images apart: oneDNN takes a
            # permuted HWC view (from_numpy(hwc).permute(2, 0, 1)[None], batch stride 3) for
            # NCHW, which ran a small CNN 2.4x slower
            if not (x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) == x[0].numel()):
                x = x.clone(memory_format=torch.channels_last)
        run = self.__dict__.get("_compiled")
        out = (self.layers if run is None else run)(x)[..., :expected[0], :expected[1]]
        if tuple(out.shape[-2:]) != expected:  # cannot happen for a correct plan: fail loudly
            raise RuntimeError(f"dense map {tuple(out.shape[-2:])} != geometry {expected} ({self.plan} plan)")
        return out.float() if self.precision == "bf16" else out

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype to give forward: the parameters' (float32 for bf16, cast inside forward)."""
        param = next(self.parameters(), None)
        return torch.float32 if param is None or self.precision == "bf16" else param.dtype

    def _walk(self, side: int):
        """(module, output side, output channels) of every layer for a side x side input, after
        the padding forward adds to reach whole groups; first the input itself as (None, padded
        side, input channels)."""
        g = self.geometry
        out = g.output_side(side)
        whole = -(-out // self.group) * self.group
        n = g.input_side(whole) if whole != out else side  # forward pads to whole groups
        first = next((m for m in self.layers if isinstance(m, (nn.Conv2d, AnchConv2d))), None)
        c = first.weight.shape[1] * getattr(first, "groups", 1) if first is not None else 3
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

    def _graph_sides(self, side: int) -> List[int]:
        return [(side - extent) // sigma + 1 for extent, sigma, *_ in self._costs]

    def multiply_adds(self, side: int) -> int:
        """Convolution multiply-adds of one forward pass on a side x side input (per image),
        counted from the layers' shapes: the cost model the benchmarks compare against."""
        if self._costs is not None:
            return sum(n * n * cost[3] for n, cost in zip(self._graph_sides(side), self._costs))
        return sum(n * n * m.weight[0].numel() * m.weight.shape[0]
                   for m, n, _ in self._walk(side) if isinstance(m, (nn.Conv2d, AnchConv2d)))

    def activation_bytes(self, side: int) -> int:
        """Peak bytes of activations held at once in one forward pass on a side x side
        input (per image): the largest input + output pair of a layer (for a graph: the
        largest node's inputs + output), in the precision the layers run in. Used to choose
        the ROI size that fits a memory budget."""
        param = next(self.parameters(), None)
        item = 2 if self.precision == "bf16" else (param.element_size() if param is not None else 4)
        if self._costs is not None:
            sizes = [n * n * (cost[2] or 3) for n, cost in zip(self._graph_sides(side), self._costs)]
            return item * max(sizes[i] + sum(sizes[j] for j in cost[4])
                              for i, cost in enumerate(self._costs) if cost[4] or len(sizes) == 1)
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
    if layer.kind == "conv":
        m = layer.module
        m.stride, m.dilation = (stride, stride), (dilation, dilation)
        return m
    return _pool(layer.kind, layer.kernel, stride, dilation)


def _anchor(layer: _Layer, s_a: int, d_a: int, dilation: int, pos: int) -> nn.Module:
    if layer.kind == "conv":
        if layer.module.groups != 1:
            if d_a == 1 or s_a == d_a:  # an ordinary strided (d_a = 1) or dilated (s_a = d_a) convolution
                return _spatial(layer, s_a if d_a == 1 else 1, dilation)
            raise InvalidArgumentError(f"plan='paper' turns layer {pos} (groups={layer.module.groups}) into an "
                                       f"AnchConv2d with anchor stride {s_a} and operating distance {d_a}, which "
                                       "has groups=1 only; use plan='minimal'")
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
            modules.append(_anchor(layer, s * alpha, alpha, alpha * layer.dilation, pos))
        else:
            delta = stride // (alpha * c_prev)  # phase spacing in units of the current feature
            if delta % s == 0:
                modules.append(layer.module if layer.kind == "conv" else _spatial(layer, s, layer.dilation))
            else:
                if stride % (alpha * c_prev) or delta != 1:
                    raise InvalidArgumentError(
                        f"plan='paper' is undefined here: at the reconstruction layer (position {pos}) the phase "
                        f"spacing is {stride / (alpha * c_prev):g} features, not 1; use plan='minimal'")
                modules.append(_anchor(layer, s, alpha, layer.dilation, pos))
                reconstructed, group = True, (alpha if s < alpha else 1)
        c_prev *= s
    return modules, group


def to_dense(model: nn.Module, alpha: int = 1, plan: str = "minimal", precision: str = "fp32",
             compile: bool = False, normalize=None, layout: str = "auto") -> DenseModel:
    """Convert a padding-free patch classifier into a dense scanner (DESIGN.md 2.2-2.3).

    Args:
        model: a padding-free network: a (nested) nn.Sequential of the layers listed in the
            module docstring, or any model torch.fx can trace built from them, additions,
            channel concatenations and constant crops. It is not modified; the dense model
            holds frozen copies of its parameters.
        alpha: dense factor; must divide the network's stride S_p. The map is alpha times
            denser than the network's own stride (outputs S_p / alpha px apart).
        plan: "minimal" (every layer computes exactly the positions the output needs) or
            "paper" (Fast ScanNet's anchor-layer schedule; chains only). Both give the same
            output.
        precision: "fp32" (the model's own dtype; the reference path) or "bf16" (bfloat16
            weights and activations in channels_last, float32 accumulation inside each
            convolution, as bfloat16 autocast runs them; 3-4x faster on AMX CPUs; the map is
            returned as float32).
        compile: torch.compile the layers (first call compiles; results stay within the
            precision's tolerance).
        normalize: None or (mean, std), one number per input channel: the dense model
            computes the network on (x - mean) / std, folded into the convolutions that
            read the input (exact: there is no padding).
        layout: float32 on the CPU: "auto" (channels_last unless large kernels do most of
            the work, :meth:`DenseModel.auto_layout`), "nchw" or "channels_last".
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
    if normalize is not None:
        if isinstance(normalize, dict):
            normalize = (normalize.get("mean"), normalize.get("std"))
        try:
            mean, std = normalize
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"normalize must be None or (mean, std), got {normalize!r}") from None
        normalize = check_mean_std(mean, std)
    kind, front = _front_end(model, normalize)
    geo = _geometry_of(front) if kind == "chain" else Geometry(front.out.extent, front.out.c)
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 1 or geo.stride % alpha:
        raise InvalidArgumentError(f"alpha must be a positive integer dividing the network's stride "
                                   f"{geo.stride}, got {alpha!r}")
    geo = Geometry(geo.patch, geo.stride, alpha)
    if kind == "graph":
        if plan == "paper":
            raise InvalidArgumentError(f"plan='paper' is defined for chains only; use plan='minimal' "
                                       f"({front.graph_node()} makes {type(model).__name__} a graph)")
        layers = front.run(geo.step)
        dense = DenseModel(layers, geo, plan, precision, 1, front.ends_with_softmax, front.costs)
    else:
        if plan == "minimal":
            modules, group = _plan_minimal(front, geo.step), 1
        else:
            modules, group = _plan_paper(front, geo.stride, alpha)
        dense = DenseModel(nn.Sequential(*modules), geo, plan, precision, group)
    param = next(model.parameters(), None)
    if precision == "bf16":
        dense = dense.to(torch.bfloat16, memory_format=torch.channels_last)
    elif param is not None:
        dense = dense.to(param.dtype)
    dense.requires_grad_(False).eval()
    dense.layout = layout
    return dense.compile_layers() if compile else dense
