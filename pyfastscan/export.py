"""Export a dense scanner to ONNX for a fixed ROI size, for ONNX Runtime, TensorRT and
other tools that do not run PyTorch.

    info = export_onnx(model, "vgg_a2.onnx", roi_outputs=16, alpha=2)
    info["input_shape"], info["output_shape"]   # ('N', 3, 484, 484), ('N', 2, 16, 16)

The graph holds standard ONNX operators only (Conv, MaxPool, AveragePool, Slice, Max and
the pointwise layers): DESIGN.md 2.3's minimal plan runs ordinary strided, dilated layers,
and the pieces pyfastscan computes with its own ops are rewritten here:

* anchor layers with d_a = 1 (stride s_a) or s_a = d_a (stride 1) are ordinary layers;
* dilated average pooling (AnchPool2d, mode "avg", d_a = 1) is a depthwise convolution
  with weights 1/K^2 and that stride and dilation;
* dilated max pooling is the elementwise Max of its K*K strided slices (bitwise the same
  values): TensorRT's ONNX parser rejects pooling with dilations other than 1.

Anchor layers with d_a > 1 and s_a != d_a (the paper plan's layers after the
reconstruction layer) are no strided, dilated operation and are refused.
"""
import copy
import logging
import os
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseModel, to_dense
from .errors import InvalidArgumentError
from .io.files import atomic_write, prepare_folder
from .nn import AnchConv2d, AnchPool2d

INPUT_NAME, OUTPUT_NAME = "roi", "logits"
logger = logging.getLogger("pyfastscan")


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


class _DilatedMaxPool2d(nn.Module):
    """max_pool2d(x, k, s, dilation=d) as the Max of K*K strided slices (Slice + Max in ONNX)."""

    def __init__(self, kernel: int, stride: int, dilation: int):
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def forward(self, x):
        k, s, d = self.kernel, self.stride, self.dilation
        h, w = x.shape[-2:]
        span_y = (h - d * (k - 1) - 1) // s * s + 1  # rows from the first to the last tap of one tap index
        span_x = (w - d * (k - 1) - 1) // s * s + 1
        out = None
        for ty in range(k):
            for tx in range(k):
                tap = x[:, :, ty * d:ty * d + span_y:s, tx * d:tx * d + span_x:s]
                out = tap if out is None else torch.maximum(out, tap)
        return out

    def extra_repr(self):
        return f"kernel_size={self.kernel}, stride={self.stride}, dilation={self.dilation}"


def _anchor_stride(m, pos: int) -> int:
    """The ordinary stride of an anchor layer, or an error if it has none."""
    s_a, d_a = _first(m.anchor_stride), _first(m.operating_distance)
    if d_a == 1:
        return s_a
    if s_a == d_a:
        return 1
    raise InvalidArgumentError(
        f"layer {pos} ({type(m).__name__}, anchor_stride={s_a}, operating_distance={d_a}) is an anchor layer with "
        f"d_a > 1 and s_a != d_a, which no standard ONNX operator expresses; export the model converted with "
        f"plan=\"minimal\" (same map, standard strided and dilated layers only)")


class _DilatedAvgPool2d(nn.Module):
    """avg_pool2d with a dilation: the mean of the K*K taps as a depthwise Conv with weights
    1/K^2 (the channel count is read from the input, for graphs whose channels are not
    tracked here)."""

    def __init__(self, kernel: int, stride: int, dilation: int):
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def forward(self, x):
        c, k = x.shape[1], self.kernel
        w = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=x.dtype, device=x.device)
        return F.conv2d(x, w, None, self.stride, 0, self.dilation, c)


def _standard_module(m: nn.Module, where, channels: Optional[int]) -> Optional[nn.Module]:
    """The standard-operator module that replaces ``m`` (None: keep ``m``)."""
    if isinstance(m, AnchConv2d):
        o, c, k = m.weight.shape[0], m.weight.shape[1], m.weight.shape[-1]
        conv = nn.Conv2d(c, o, k, _anchor_stride(m, where), dilation=_first(m.dilation), bias=m.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(m.weight.float())
            if m.bias is not None:
                conv.bias.copy_(m.bias.float())
        return conv
    if isinstance(m, AnchPool2d):
        k, s, d = _first(m.kernel_size), _anchor_stride(m, where), _first(m.dilation)
        if m.mode == "max":
            return nn.MaxPool2d(k, s) if d == 1 else _DilatedMaxPool2d(k, s, d)
        if d == 1:
            return nn.AvgPool2d(k, s)
        if channels is None:
            return _DilatedAvgPool2d(k, s, d)
        conv = nn.Conv2d(channels, channels, k, s, dilation=d, groups=channels, bias=False)
        with torch.no_grad():
            conv.weight.fill_(1.0 / (k * k))
        return conv
    if isinstance(m, nn.MaxPool2d) and _first(m.dilation) != 1:
        return _DilatedMaxPool2d(_first(m.kernel_size), _first(m.stride), _first(m.dilation))
    return None


def _standard_layers(dense: DenseModel) -> nn.Module:
    """float32 copies of the dense model's layers, each a standard-operator module: a chain
    layer by layer; a graph (torch.fx GraphModule) with its submodules replaced in place."""
    if not isinstance(dense.layers, nn.Sequential):
        gm = copy.deepcopy(dense.layers).float()
        for name, m in list(gm.named_modules()):
            new = _standard_module(m, name, None)
            if new is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
        return gm.requires_grad_(False).eval()
    out: List[nn.Module] = []
    first = next((m for m in dense.layers if isinstance(m, (nn.Conv2d, AnchConv2d))), None)
    channels = first.weight.shape[1] if first is not None else 3
    for pos, m in enumerate(dense.layers):
        new = _standard_module(m, pos, channels)
        out.append(new if new is not None else copy.deepcopy(m).float())
        if isinstance(m, (nn.Conv2d, AnchConv2d)):
            channels = m.weight.shape[0]
    return nn.Sequential(*out).requires_grad_(False).eval()


def _exportable(dense: DenseModel) -> DenseModel:
    """A copy of ``dense`` (its forward unchanged) running the standard layers in float32."""
    layers = _standard_layers(dense)
    exp = copy.copy(dense)
    exp.__dict__ = dict(dense.__dict__)
    exp._parameters, exp._buffers = dict(dense._parameters), dict(dense._buffers)
    exp._modules = {name: (layers if name == "layers" else copy.deepcopy(m)) for name, m in dense._modules.items()}
    exp.__dict__.pop("_compiled", None)  # the standard layers run eagerly
    exp.precision = "fp32"
    return exp.float().eval()


def _dense_of(model, alpha, plan, normalize) -> DenseModel:
    if isinstance(model, DenseModel):
        if alpha is not None and alpha != model.geometry.alpha:
            raise InvalidArgumentError(f"alpha={alpha} given for a DenseModel converted with alpha "
                                       f"{model.geometry.alpha}; pass alpha=None or convert the classifier again")
        if normalize is not None:
            raise InvalidArgumentError("normalize= applies when converting a classifier; this DenseModel is "
                                       "already converted (pass normalize to to_dense)")
        return model
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a DenseModel or an nn.Module classifier, got {type(model).__name__}")
    kwargs = {} if normalize is None else {"normalize": normalize}
    try:
        return to_dense(model, 1 if alpha is None else alpha, plan=plan, **kwargs)
    except TypeError as exc:
        if "normalize" in str(exc):
            raise InvalidArgumentError("this version of pyfastscan.to_dense takes no normalize= argument") from None
        raise


def _save(onnx, proto, tmp: str) -> None:
    onnx.save_model(proto, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from the tools of other users


def export_onnx(model: nn.Module, path, *, roi_outputs: int, alpha: Optional[int] = None, plan: str = "minimal",
                normalize=None, opset: Optional[int] = None) -> dict:
    """Write the dense scanner for a fixed ROI size as an ONNX file (written atomically).

    Args:
        model: a DenseModel (its own alpha and plan are kept; ``alpha`` must then be None or
            equal, ``plan`` and ``normalize`` are not used), or a padding-free patch
            classifier, converted with ``to_dense(model, alpha or 1, plan=plan,
            normalize=normalize)`` (``normalize`` passed only when given).
        path: the .onnx file to write; its folder is created if missing.
        roi_outputs: R, the side of the map one ROI yields. The input side is
            L_r' = geometry.input_side(R) = patch + (R - 1) * step.
        opset: ONNX opset (None: the exporter's default).
    Returns:
        dict with path, input_shape ("N", C, L_r', L_r'), output_shape ("N", K, R, R),
        geometry (patch, stride, alpha, step, input_side, output_side), plan, precision and
        opset. The batch N is dynamic. The graph computes in float32: a bf16 DenseModel is
        exported with its bfloat16-rounded weights held (exactly) in float32, a float64 one
        with its weights rounded to float32.

    Output (n, k, i, j) is the classifier's output for the patch of ROI n whose top-left
    corner is (i * step, j * step) (DESIGN.md 2.2); ROIs read S_r = R * step px apart tile
    the slide's map (2.4). The same facts are written to the file's metadata_props.

    Raises:
        InvalidArgumentError: anchor layers with no standard-operator form (use
            plan="minimal"), a bad roi_outputs, or an output folder that cannot be written.

    Example:
        >>> from pyfastscan.models import vgg16_fcn
        >>> info = export_onnx(vgg16_fcn(width=1 / 32), "/tmp/vgg.onnx", roi_outputs=4, alpha=2)  # doctest: +SKIP
        >>> info["input_shape"], info["output_shape"]  # doctest: +SKIP
        (('N', 3, 292, 292), ('N', 2, 4, 4))
    """
    if not isinstance(roi_outputs, int) or isinstance(roi_outputs, bool) or roi_outputs < 1:
        raise InvalidArgumentError(f"roi_outputs must be a positive integer, got {roi_outputs!r}")
    try:
        import onnx
    except ImportError:
        raise InvalidArgumentError("export_onnx needs the onnx and onnxscript packages: "
                                   "pip install onnx onnxscript") from None
    dense = _dense_of(model, alpha, plan, normalize)
    geo = dense.geometry
    if dense.precision == "bf16":
        logger.warning("export_onnx: the bf16 DenseModel is exported in float32 (its bfloat16-rounded weights, "
                       "float32 activations); build a half-precision engine from it with the runtime "
                       "(e.g. trtexec --fp16)")
    exp = _exportable(dense)
    path = os.fspath(path)
    prepare_folder(os.path.dirname(os.path.abspath(path)))
    side = geo.input_side(roi_outputs)
    first = next((m for m in exp.layers.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.weight.shape[1] * first.groups if first is not None else 3
    x = torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = exp(x)
    expected = (2, y.shape[1], roi_outputs, roi_outputs)
    if tuple(y.shape) != expected:  # cannot happen for a correct conversion: fail loudly
        raise RuntimeError(f"exported map {tuple(y.shape)} != geometry {expected}")

    program = torch.onnx.export(exp, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                verbose=False)
    proto = program.model_proto
    from ._version import __version__

    geometry = {"patch": geo.patch, "stride": geo.stride, "alpha": geo.alpha, "step": geo.step,
                "input_side": side, "output_side": roi_outputs}
    precision = ("float32 (bfloat16-rounded weights)" if dense.precision == "bf16" else "float32")
    meta = {**{k: str(v) for k, v in geometry.items()}, "plan": dense.plan, "precision": precision,
            "pyfastscan_version": __version__,
            "layout": (f"{OUTPUT_NAME}[n, k, i, j] = classifier output for the {geo.patch} px patch of {INPUT_NAME}[n] "
                       f"at top-left (row i*{geo.step}, col j*{geo.step}); ROIs {roi_outputs * geo.step} px apart "
                       f"tile the slide map")}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    for key, value in kept + list(meta.items()):
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "pyfastscan", __version__
    onnx.checker.check_model(proto)

    atomic_write(path, lambda tmp: _save(onnx, proto, tmp))
    return {"path": path, "input_shape": ("N", channels, side, side),
            "output_shape": ("N", int(y.shape[1]), roi_outputs, roi_outputs), "geometry": geometry,
            "plan": dense.plan, "precision": precision,
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}
