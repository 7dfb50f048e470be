"""H&E colour deconvolution and fused stain augmentation (DESIGN.md 3; Tellez et al. 2018).

Follow one call: ``hed_augment`` validates (``_check_*``), folds alpha and beta into
per-image parameters (``fused_params``: one 3x3 matrix and offset in log space, and for
uint8 nine 256-entry tables), then ``backends.dispatch`` picks a backend:

    torch   pyfastscan/reference/stain.py   hed_augment_ref   (the specification, float64)
    cpu     csrc/cpu/stain_cpu.cpp          hed_augment_cpu   (below)
    cuda    csrc/cuda/stain_cuda.cu         hed_augment_cuda  (below)
    triton  kernels/stain.py                hed_augment_triton

The per-pixel math is in csrc/include/hed.h; tests/test_stain.py proves each backend
equal to the reference and the reference equal to scikit-image.

Layouts: (N, 3, H, W) by default, (N, H, W, 3) with ``channels_last=True``; a single
image may drop N. uint8 images are in [0, 255], float images in [0, 1].
"""
import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _native
from ..backends import Impl, dispatch
from ..errors import InvalidArgumentError
from ..reference.stain import (EPS, LOG_ADJUST, hed_augment_ref, hed_from_rgb, hed_to_rgb_ref, rgb_from_hed,
                               rgb_to_hed_ref)

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float64)


class FusedParams(NamedTuple):
    """Per-image parameters of the fused pass (csrc/include/hed.h).

    m: (N, 3, 3) float64, hed_from_rgb diag(alpha) rgb_from_hed.
    k: (N, 3) float64, -L * (beta @ rgb_from_hed) with L = -ln(1e-6).
    tables: (N, 3, 3, 256) float32, T[i][j][v] = exp(ln(max(v/255, 1e-6)) m_ij), row i = 0
        also times 255 exp(k_j).
    """

    m: torch.Tensor
    k: torch.Tensor
    tables: Optional[torch.Tensor]


def fused_params(alpha: torch.Tensor, beta: torch.Tensor, with_tables: bool) -> FusedParams:
    """Fold hed' = alpha * hed + beta into the log-space affine map of csrc/include/hed.h,
    in float64 on the CPU (a few hundred numbers per image)."""
    a, b = alpha.detach().double().cpu(), beta.detach().double().cpu()
    m = (hed_from_rgb()[None] * a[:, None, :]) @ rgb_from_hed()  # (N, 3, 3)
    k = -LOG_ADJUST * (b @ rgb_from_hed())  # (N, 3)
    tables = None
    if with_tables:  # one outer product (each entry one rounded product, as a broadcast multiply) and exp
        t = torch.outer(m.reshape(-1), _log_levels()).exp_().reshape(-1, 3, 3, 256)  # (N, i, j, v)
        t[:, 0] *= (255 * torch.exp(k))[:, :, None]
        tables = t.float()
    return FusedParams(m, k, tables)


@functools.lru_cache(maxsize=1)
def _log_levels() -> torch.Tensor:
    """(256,) float64: ln(max(v / 255, EPS)) for v = 0..255."""
    return torch.log(torch.clamp(torch.arange(256, dtype=torch.float64) / 255, min=EPS))


# ----------------------------------------------------------------------------- validation


def _check_image(rgb, name: str, channels_last: bool, dtypes=IMAGE_DTYPES) -> torch.Tensor:
    """Returns rgb with a batch axis (N, 3, H, W) or (N, H, W, 3)."""
    if not isinstance(rgb, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(rgb).__name__}")
    if rgb.dtype not in dtypes:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(str(d) for d in dtypes)}, got {rgb.dtype}")
    if rgb.dim() not in (3, 4):
        raise InvalidArgumentError(f"{name} must be (N, 3, H, W), (3, H, W) or channel-last with "
                                   f"channels_last=True, got shape {tuple(rgb.shape)}")
    axis = -1 if channels_last else -3
    if rgb.shape[axis] != 3:
        layout = "(..., H, W, 3)" if channels_last else "(..., 3, H, W)"
        raise InvalidArgumentError(f"{name} must have 3 channels in layout {layout} (channels_last="
                                   f"{channels_last}), got shape {tuple(rgb.shape)}")
    return rgb if rgb.dim() == 4 else rgb[None]


def _check_params(alpha, beta, n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    out = []
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise InvalidArgumentError(f"{name} must be a tensor of shape (N, 3) or (3,), got {v!r}") from None
        if not v.is_floating_point():
            v = v.double()
        if v.device != device and v.device.type != "cpu":
            raise InvalidArgumentError(f"{name} is on {v.device}, the image on {device}")
        if tuple(v.shape) == (3,):
            v = v.expand(n, 3)
        if tuple(v.shape) != (n, 3):
            raise InvalidArgumentError(f"{name} must have shape ({n}, 3) (one value per image and stain "
                                       f"channel H, E, DAB) or (3,), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise InvalidArgumentError(f"{name} must be finite, got {v.tolist()}")
        out.append(v)
    return out[0], out[1]


def _float_out(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float() / 255 if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------- public API


def rgb_to_hed(rgb: torch.Tensor, *, clamp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """RGB to H, E, DAB stain densities (scikit-image ``rgb2hed``; ``clamp=True`` clamps
    them at 0 exactly as it does).

    Args:
        rgb: uint8 in [0, 255] or float in [0, 1]; (N, 3, H, W) or (3, H, W), or channel-last
            with ``channels_last=True``.
    Returns:
        Same layout, float64 for float64 input, else float32.

    Example:
        >>> rgb_to_hed(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten().tolist()
        [0.0, 0.0, 0.0]
    """
    x = _check_image(rgb, "rgb", channels_last)
    hwc = x if channels_last else x.movedim(1, -1)
    hed = rgb_to_hed_ref(_float_out(hwc), clamp=clamp)
    hed = hed if channels_last else hed.movedim(-1, 1)
    return hed if rgb.dim() == 4 else hed[0]


def hed_to_rgb(hed: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """H, E, DAB densities back to RGB in [0, 1] (scikit-image ``hed2rgb``). float32 or
    float64 in, the same out; layout as :func:`rgb_to_hed`."""
    x = _check_image(hed, "hed", channels_last, (torch.float32, torch.float64))
    hwc = x if channels_last else x.movedim(1, -1)
    rgb = hed_to_rgb_ref(hwc)
    rgb = rgb if channels_last else rgb.movedim(-1, 1)
    return rgb if hed.dim() == 4 else rgb[0]


def sample_hed_params(n: int, sigma: float = 0.05, generator: Optional[torch.Generator] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tellez et al.'s random stain parameters: alpha ~ U(1 - sigma, 1 + sigma) and
    beta ~ U(-sigma, sigma), per image and stain channel. Reproducible with a generator.

    Returns:
        (alpha, beta), each (n, 3) float64 on the CPU.
    """
    if not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"n must be a non-negative int, got {n!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and 0 <= sigma < 1):
        raise InvalidArgumentError(f"sigma must be in [0, 1), got {sigma!r}")
    u = torch.rand(2, n, 3, generator=generator, dtype=torch.float64)
    return 1 - sigma + 2 * sigma * u[0], -sigma + 2 * sigma * u[1]


def hed_augment(rgb: torch.Tensor, alpha, beta, *, channels_last: bool = False, backend: str = "auto",
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H&E stain augmentation (Tellez Eqs. 5-7) in one fused pass per pixel: read RGB,
    deconvolve, hed' = alpha * hed + beta per stain, recombine, clip, write.

    Args:
        rgb: uint8 (N, 3, H, W) in [0, 255] or float32 / float64 in [0, 1]; (N, H, W, 3) with
            ``channels_last=True``; a single image may drop N.
        alpha, beta: (N, 3) or (3,), per image and stain channel (H, E, DAB); see
            :func:`sample_hed_params`.
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        out: optional tensor like ``rgb`` (same shape, dtype, device, contiguous) to write
            into; may be ``rgb`` itself.
    Returns:
        Same shape and dtype as ``rgb``; uint8 rounds to nearest. alpha = 1, beta = 0 returns
        a uint8 image unchanged.

    Example:
        >>> img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        >>> alpha, beta = sample_hed_params(2, sigma=0.05, generator=torch.Generator().manual_seed(0))
        >>> hed_augment(img, alpha, beta).shape
        torch.Size([2, 3, 64, 64])
    """
    x = _check_image(rgb, "rgb", channels_last)
    a, b = _check_params(alpha, beta, x.shape[0], x.device)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != rgb.shape or out.dtype != rgb.dtype \
                or out.device != rgb.device or not out.is_contiguous():
            got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out)
            raise InvalidArgumentError(f"out must be a contiguous tensor of shape {tuple(rgb.shape)}, dtype "
                                       f"{rgb.dtype} on {rgb.device}, got {got}")
    if out is None:
        dst = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        dst = out if out.dim() == 4 else out[None]
    if x.numel():
        dispatch("hed_augment", backend, _IMPLS, x.device, x.contiguous(), a, b, channels_last, dst)
    if out is not None:
        return out
    return dst if rgb.dim() == 4 else dst[0]


# ----------------------------------------------------------------------------- backends


def hed_augment_torch(x, alpha, beta, channels_last, dst):
    """The reference, in float64."""
    hwc = x if channels_last else x.movedim(1, -1)
    y = hed_augment_ref(_float_out(hwc).double(), alpha.double().to(x.device), beta.double().to(x.device))
    if x.dtype == torch.uint8:
        y = torch.round(y * 255).clamp_(0, 255)  # round half to even, like the kernels' rint
    y = y if channels_last else y.movedim(-1, 1)
    dst.copy_(y.to(x.dtype))


def hed_augment_cpu(x, alpha, beta, channels_last, dst):
    """C++ fused kernel (csrc/cpu/stain_cpu.cpp), OpenMP over (image, block of pixels)."""
    p = fused_params(alpha, beta, x.dtype == torch.uint8)
    buf = _native.buffer
    if x.dtype == torch.uint8:
        _native.cpu().hed_augment_u8(buf(x), buf(dst), buf(p.tables), channels_last)
    else:
        _native.cpu().hed_augment_float(buf(x), buf(dst), buf(p.m.to(x.dtype)), buf(p.k.to(x.dtype)),
                                        channels_last)


def hed_augment_cuda(x, alpha, beta, channels_last, dst):
    """CUDA fused kernel (csrc/cuda/stain_cuda.cu), one thread per pixel."""
    p = fused_params(alpha, beta, x.dtype == torch.uint8)
    n, hw = x.shape[0], x[0].numel() // 3
    stream = torch.cuda.current_stream(x.device).cuda_stream
    dev = _native.cuda_device_index(x)  # _C_cuda makes it current for the launch
    if x.dtype == torch.uint8:
        t = p.tables.to(x.device)
        _native.cuda().hed_augment_u8(x.data_ptr(), dst.data_ptr(), t.data_ptr(), n, hw, channels_last, dev, stream)
    else:
        m, k = p.m.to(x.device, x.dtype), p.k.to(x.device, x.dtype)
        _native.cuda().hed_augment_float(x.data_ptr(), dst.data_ptr(), m.data_ptr(), k.data_ptr(),
                                         x.dtype == torch.float64, n, hw, channels_last, dev, stream)


def _triton(x, alpha, beta, channels_last, dst):
    from ..kernels.stain import hed_augment_triton  # imported late: TRITON_INTERPRET is read at import

    p = fused_params(alpha, beta, x.dtype == torch.uint8)
    hed_augment_triton(x, dst, p, channels_last)  # makes x's device current for the launch


def _triton_reason(x, *args):
    return "the Triton kernel takes uint8 and float32" if x.dtype == torch.float64 else None


_IMPLS = {
    "torch": Impl(hed_augment_torch),
    "cpu": Impl(hed_augment_cpu),
    "cuda": Impl(hed_augment_cuda),
    "triton": Impl(_triton, _triton_reason),
}
