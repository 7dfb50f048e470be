"""Anchor layers of Fast ScanNet: AnchPool2d and AnchConv2d (DESIGN.md 2.1).

Follow one call: ``anch_conv2d`` validates its arguments (``_check_*``), then
``backends.dispatch`` picks a backend:

    torch   pyfastscan/reference/anchor.py   anch_conv2d_ref   (the specification)
    cpu     csrc/cpu/anchor_cpu.cpp          anch_conv2d_cpu   (below: lowering or gather + GEMM)
    cuda    csrc/cuda/anchor_cuda.cu         anch_conv2d_cuda  (below: lowering or pointers to _C_cuda)
    triton  kernels/anchor.py                anch_conv2d_triton

and tests/test_anchor.py proves each equal to the reference.
"""
import contextlib
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _native
from ..backends import Impl, cuda_reason, dispatch
from ..errors import InvalidArgumentError
from ..reference.anchor import anch_conv2d_ref, anch_pool2d_ref

IntOrPair = Union[int, Tuple[int, int]]
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Bytes of the gather buffer per GEMM block of the C++ AnchConv path.
_COL_BUDGET_BYTES = 128 << 20


class AnchorAxis(NamedTuple):
    """Geometry of an anchor operation along one axis (DESIGN.md 2.1)."""

    kernel: int
    dilation: int
    anchor_stride: int
    operating_distance: int

    def start(self, p: int) -> int:
        """First input position read by output index p."""
        return (p // self.operating_distance) * self.anchor_stride + p % self.operating_distance

    @property
    def span(self) -> int:
        """Input extent of one output position's taps: d*(K-1) + 1."""
        return self.dilation * (self.kernel - 1) + 1

    def out_len(self, n: int) -> int:
        """Number of output positions for an input of length n: the longest prefix of
        p whose taps are all inside the input (closed form of the enumeration in the
        reference; the C++ header has the same formula). Group g (outputs g*d_a ..
        g*d_a + d_a - 1) is whole when g*s_a + d_a - 1 <= m = n - span; the group after the
        whole ones contributes the outputs whose start is <= m."""
        m = n - self.span
        if m < 0:
            return 0
        da = self.operating_distance
        full = (m - da + 1) // self.anchor_stride + 1 if m >= da - 1 else 0
        rest = m - full * self.anchor_stride + 1
        return full * da + max(0, min(da, rest))

    @property
    def is_standard(self) -> Optional[Tuple[int, int]]:
        """(stride, dilation) of the ordinary convolution / pooling this axis equals, if any:
        d_a = 1 is stride s_a; s_a = d_a is stride 1."""
        if self.operating_distance == 1:
            return self.anchor_stride, self.dilation
        if self.anchor_stride == self.operating_distance:
            return 1, self.dilation
        return None


# ----------------------------------------------------------------------------- validation


def _pair(name: str, value) -> Tuple[int, int]:
    vals = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) \
        if isinstance(value, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise InvalidArgumentError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < 1:
        raise InvalidArgumentError(f"{name} must be positive, got {value!r}")
    return vals


def _axes(x_hw, kernel_size, dilation, anchor_stride, operating_distance) -> Tuple[AnchorAxis, AnchorAxis]:
    k, d = _pair("kernel_size", kernel_size), _pair("dilation", dilation)
    s, da = _pair("anchor_stride", anchor_stride), _pair("operating_distance", operating_distance)
    axes = tuple(AnchorAxis(k[i], d[i], s[i], da[i]) for i in range(2))
    for i, name in enumerate(("height", "width")):
        a = axes[i]
        if a.span > x_hw[i]:
            raise InvalidArgumentError(
                f"kernel larger than the input: kernel_size={kernel_size!r} with dilation={dilation!r} spans "
                f"{a.span} px along the {name}, the input has {x_hw[i]}")
    return axes


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InvalidArgumentError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise InvalidArgumentError(f"x must be float32, float64 or bfloat16, got {x.dtype}")


def _check_weight(x, weight, bias) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InvalidArgumentError(f"weight must have shape (O, C={x.shape[1]}, Ky, Kx) for x of shape "
                                   f"{tuple(x.shape)}, got {got}")
    tensors = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise InvalidArgumentError(f"bias must have shape ({weight.shape[0]},), got {got}")
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise InvalidArgumentError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise InvalidArgumentError(f"{name} is on {t.device}, x is on {x.device}")


# ----------------------------------------------------------------------------- public API


def anch_pool2d(x: torch.Tensor, kernel_size: IntOrPair, *, anchor_stride: IntOrPair,
                operating_distance: IntOrPair, dilation: IntOrPair = 1, mode: str = "max",
                backend: str = "auto") -> torch.Tensor:
    """Anchor pooling (AnchPool2d of Fast ScanNet), no padding.

    Output index p (per axis) pools input positions ``(p // d_a) * s_a + p % d_a + d * t``,
    t = 0..K-1. ``operating_distance=1`` is ordinary pooling with stride ``anchor_stride``.

    Args:
        x: (N, C, H, W), float32, float64 or bfloat16.
        kernel_size, anchor_stride, operating_distance, dilation: int or (h, w) pair;
            all >= 1. anchor_stride < operating_distance is allowed (groups overlap; the
            output is the longest prefix of positions whose taps are inside the input).
        mode: "max" (bitwise equal on every backend) or "avg" (mean of the K*K taps).
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see pyfastscan.backends).
    Returns:
        (N, C, Ho, Wo) with Ho = AnchorAxis(...).out_len(H), likewise Wo.

    Example:
        >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
        >>> anch_pool2d(x, 2, anchor_stride=2, operating_distance=1)[0, 0]
        tensor([[ 5.,  7.],
                [13., 15.]])
    """
    _check_input(x)
    if mode not in ("max", "avg"):
        raise InvalidArgumentError(f"mode must be 'max' or 'avg', got {mode!r}")
    ay, ax = _axes(x.shape[2:], kernel_size, dilation, anchor_stride, operating_distance)
    out_shape = (x.shape[0], x.shape[1], ay.out_len(x.shape[2]), ax.out_len(x.shape[3]))
    if x.numel() == 0:
        return x.new_empty(out_shape)
    return dispatch("anch_pool2d", backend, _POOL_IMPLS, x.device, x, ay, ax, mode)


def anch_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                anchor_stride: IntOrPair, operating_distance: IntOrPair, dilation: IntOrPair = 1,
                backend: str = "auto") -> torch.Tensor:
    """Anchor convolution (AnchConv2d of Fast ScanNet), no padding, groups 1.

    ``out[n,o,p,q] = bias[o] + sum_{c,ty,tx} weight[o,c,ty,tx] * x[n,c,tap_y(p,ty),tap_x(q,tx)]``.
    ``operating_distance=1`` is ``F.conv2d(stride=anchor_stride, dilation=dilation)``.

    Args:
        x: (N, C, H, W), float32, float64 or bfloat16.
        weight: (O, C, Ky, Kx), same dtype and device; bias: (O,) or None.
        anchor_stride, operating_distance, dilation: int or (h, w) pair.
        backend: "auto", "torch", "cpu", "cuda" or "triton".
    Returns:
        (N, O, Ho, Wo).

    Example:
        >>> x, w = torch.randn(1, 3, 20, 20), torch.randn(8, 3, 3, 3)
        >>> anch_conv2d(x, w, anchor_stride=4, operating_distance=2, dilation=2).shape
        torch.Size([1, 8, 8, 8])
    """
    _check_input(x)
    _check_weight(x, weight, bias)
    ay, ax = _axes(x.shape[2:], tuple(weight.shape[2:]), dilation, anchor_stride, operating_distance)
    out_shape = (x.shape[0], weight.shape[0], ay.out_len(x.shape[2]), ax.out_len(x.shape[3]))
    if x.shape[0] == 0 or weight.shape[0] == 0:
        return x.new_empty(out_shape)
    if x.shape[1] == 0:  # an empty sum: the bias alone
        out = x.new_zeros(out_shape)
        return out if bias is None else out + bias[None, :, None, None]
    return dispatch("anch_conv2d", backend, _CONV_IMPLS, x.device, x, weight, bias, ay, ax)


# ----------------------------------------------------------------------------- lowering


def conv_lowering(ay: AnchorAxis, ax: AnchorAxis) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """((stride_y, stride_x), (dilation_y, dilation_x)) of the ordinary convolution an
    AnchConv equals when every axis is one (d_a = 1, or s_a = d_a), else None.

    The cpu and cuda backends then run ``F.conv2d`` (oneDNN, cuDNN) instead of their
    anchor kernels (DESIGN.md 5); it has a backward, so those calls may require grad.
    """
    sy, sx = ay.is_standard, ax.is_standard
    if sy is None or sx is None:
        return None
    return (sy[0], sx[0]), (sy[1], sx[1])


def _lowered_conv(x, weight, bias, lowering) -> torch.Tensor:
    stride, dilation = lowering
    if x.device.type != "cuda":
        return F.conv2d(x, weight, bias, stride=stride, dilation=dilation)
    with torch.cuda.device(x.device), _ieee_fp32_conv(x.dtype):
        return F.conv2d(x, weight, bias, stride=stride, dilation=dilation)


@contextlib.contextmanager
def _ieee_fp32_conv(dtype):
    """cuDNN runs float32 convolutions in TF32 by default; the op promises float32 accuracy
    (DESIGN.md 5), so float32 runs in IEEE precision for the call. Uses the API of the
    installed torch (``cudnn.conv.fp32_precision`` since 2.9, else ``cudnn.allow_tf32``):
    mixing the two makes torch raise."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if dtype != torch.float32:
        yield
    elif conv is not None and hasattr(conv, "fp32_precision"):
        before = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = before
    else:
        before = cudnn.allow_tf32
        cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- cpu backend


def _no_grad_reason(*tensors) -> Optional[str]:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "inputs require grad and this kernel has no backward (use backend='torch')"
    return None


def anch_pool2d_cpu(x, ay: AnchorAxis, ax: AnchorAxis, mode: str) -> torch.Tensor:
    """C++ AnchPool (csrc/cpu/anchor_cpu.cpp), OpenMP over (N*C, output rows)."""
    n, c, h, w = x.shape
    xc = x.contiguous()
    out = torch.empty((n, c, ay.out_len(h), ax.out_len(w)), dtype=x.dtype)
    buf = _native.buffer
    _native.cpu().anchor_pool2d(buf(xc).reshape(n * c, h, w), buf(out).reshape(n * c, *out.shape[2:]),
                                tuple(ay), tuple(ax), mode == "avg", x.dtype == torch.bfloat16)
    return out


def anch_conv2d_cpu(x, weight, bias, ay: AnchorAxis, ax: AnchorAxis) -> torch.Tensor:
    """AnchConv on the CPU.

    When each axis is an ordinary strided / dilated convolution (d_a = 1, or s_a = d_a),
    it is lowered to ``F.conv2d`` (oneDNN). Otherwise a C++ anchor gather (im2col by
    anchor positions, csrc/cpu/anchor_cpu.cpp) feeds a batched GEMM, in blocks of output
    rows so the gather buffer stays under 128 MiB.
    """
    lowering = conv_lowering(ay, ax)
    if lowering is not None:
        return _lowered_conv(x, weight, bias, lowering)
    n, c, h, w = x.shape
    o = weight.shape[0]
    ho, wo = ay.out_len(h), ax.out_len(w)
    ckk = c * ay.kernel * ax.kernel
    xc = x.contiguous()
    wm = weight.reshape(o, ckk).expand(n, o, ckk)
    bias_b = None if bias is None else bias.view(1, o, 1)
    out = torch.empty((n, o, ho, wo), dtype=x.dtype)
    x_buf = _native.buffer(xc)
    rows = max(1, min(ho, _COL_BUDGET_BYTES // max(1, n * ckk * wo * x.element_size())))
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        col = torch.empty((n, ckk, (r1 - r0) * wo), dtype=x.dtype)
        _native.cpu().anchor_im2col(x_buf, _native.buffer(col), tuple(ay), tuple(ax), r0, r1)
        block = torch.bmm(wm, col) if bias_b is None else torch.baddbmm(bias_b.expand(n, o, col.shape[2]), wm, col)
        out[:, :, r0:r1, :] = block.view(n, o, r1 - r0, wo)
    return out


def _conv_reason(x, weight, bias, ay, ax) -> Optional[str]:
    """cpu and cuda AnchConv: a lowered call has F.conv2d's backward, the kernels none."""
    if conv_lowering(ay, ax) is not None:
        return None
    return _no_grad_reason(x, weight, bias)


# ----------------------------------------------------------------------------- cuda backend

_CUDA_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def anch_pool2d_cuda(x, ay: AnchorAxis, ax: AnchorAxis, mode: str) -> torch.Tensor:
    """CUDA AnchPool (csrc/cuda/anchor_cuda.cu), one thread per output element."""
    n, c, h, w = x.shape
    xc = x.contiguous()
    out = torch.empty((n, c, ay.out_len(h), ax.out_len(w)), dtype=x.dtype, device=x.device)
    _native.cuda().anchor_pool2d(xc.data_ptr(), out.data_ptr(), _CUDA_DTYPE[x.dtype], n * c, h, w, tuple(ay),
                                 tuple(ax), mode == "avg", _native.cuda_device_index(x), _stream(x))
    return out


def anch_conv2d_cuda(x, weight, bias, ay: AnchorAxis, ax: AnchorAxis) -> torch.Tensor:
    """AnchConv on CUDA: lowered to ``F.conv2d`` (cuDNN, IEEE float32) when every axis is
    an ordinary strided / dilated convolution (``conv_lowering``), else the CUDA kernel
    (csrc/cuda/anchor_cuda.cu): tiled implicit GEMM with the anchor index map."""
    lowering = conv_lowering(ay, ax)
    if lowering is not None:
        return _lowered_conv(x, weight, bias, lowering)
    n, c, h, w = x.shape
    xc, wc = x.contiguous(), weight.contiguous()
    bc = None if bias is None else bias.contiguous()
    out = torch.empty((n, weight.shape[0], ay.out_len(h), ax.out_len(w)), dtype=x.dtype, device=x.device)
    _native.cuda().anchor_conv2d(xc.data_ptr(), wc.data_ptr(), 0 if bc is None else bc.data_ptr(), out.data_ptr(),
                                 _CUDA_DTYPE[x.dtype], n, c, h, w, weight.shape[0], tuple(ay), tuple(ax),
                                 _native.cuda_device_index(x), _stream(x))
    return out


# ----------------------------------------------------------------------------- triton backend


def _pool_triton(x, ay, ax, mode):
    from ..kernels.anchor import anch_pool2d_triton  # imported late: TRITON_INTERPRET is read at import

    return anch_pool2d_triton(x, tuple(ay), tuple(ax), (ay.out_len(x.shape[2]), ax.out_len(x.shape[3])), mode == "avg")


def _conv_triton(x, weight, bias, ay, ax):
    from ..kernels.anchor import anch_conv2d_triton

    return anch_conv2d_triton(x, weight, bias, tuple(ay), tuple(ax), (ay.out_len(x.shape[2]), ax.out_len(x.shape[3])))


def _pool_ref(x, ay, ax, mode):
    return anch_pool2d_ref(x, tuple(ay), tuple(ax), mode)


def _conv_ref(x, weight, bias, ay, ax):
    return anch_conv2d_ref(x, weight, bias, tuple(ay), tuple(ax))


def _conv_cuda_device_reason(device, x, weight, bias, ay, ax) -> Optional[str]:
    """A lowered AnchConv on a CUDA tensor needs only cuDNN, not _C_cuda."""
    if device.type == "cuda" and conv_lowering(ay, ax) is not None:
        return None
    return cuda_reason(device)


_POOL_IMPLS = {
    "torch": Impl(_pool_ref),
    "cpu": Impl(anch_pool2d_cpu, lambda x, *a: _no_grad_reason(x)),
    "cuda": Impl(anch_pool2d_cuda, lambda x, *a: _no_grad_reason(x)),
    "triton": Impl(_pool_triton, lambda x, *a: _no_grad_reason(x)),
}
_CONV_IMPLS = {
    "torch": Impl(_conv_ref),
    "cpu": Impl(anch_conv2d_cpu, _conv_reason),
    "cuda": Impl(anch_conv2d_cuda, _conv_reason, _conv_cuda_device_reason),
    "triton": Impl(_conv_triton, lambda x, w, b, *a: _no_grad_reason(x, w, b)),
}
