"""Batch augmentations on the device the model trains on (issue 18).

    aug = Augment("tellez_rcsehbg", patch=100)
    x = aug(batch_uint8, generator)        # (N, 3, 128, 128) uint8 -> (N, 3, 100, 100) float in [0, 1]

One call samples every image's parameters (:meth:`Augment.sample`, a :class:`Params` of
tensors, reproducible with a ``torch.Generator``) and applies them (:meth:`Augment.apply`)
in this order:

1. HED stain (Tellez Eqs. 5-7): ``hed' = alpha * hed + beta`` per stain, alpha and beta
   uniform in ``hed_alpha`` / ``hed_beta`` per image and stain, on the uint8 context with
   the package's fused kernel :func:`pyfastscan.ops.hed_augment`.
2. Geometry: a random multiple of 90 degrees (``rot90``) and mirror (``flip``), exact; then
   zoom (factor uniform in ``zoom``; > 1 magnifies), shift (uniform in ``[-shift_px,
   shift_px]`` per axis) and elastic deformation (Simard et al.: a displacement field of
   uniform [-1, 1] noise smoothed by a Gaussian of ``elastic_sigma`` px, zero beyond the
   field, and scaled by ``elastic_alpha`` px) as one bilinear resampling of the context into
   the ``patch`` x ``patch`` centre (the affine part as one ``affine_grid``, kornia's
   Gaussian kernel for the field, applied as two matrix products; reflection beyond the
   context).
   One resampling, not kornia's ``warp_affine`` then ``elastic_transform2d``: every
   resampling blurs, and Tellez's zoom and elastic deformation are one warp.
3. Colour, contrast, brightness (PIL ``ImageEnhance`` semantics, each clipped to [0, 1]):
   colour blends with the image's grey (``0.299 R + 0.587 G + 0.114 B``), contrast with the
   mean grey, brightness with black, by factors uniform in ``saturation``, ``contrast``,
   ``brightness``.
4. Gaussian blur, sigma uniform in ``blur_sigma`` px (kornia ``gaussian_blur2d``).
5. Additive Gaussian noise, std uniform in ``noise_std`` (on [0, 1] intensities), clipped.

Presets (``PRESETS``):

- ``tellez_rcsehbg``: Tellez et al. 2018's RCSEHBG set with the paper's ranges: Rotation
  (90 degree multiples and mirroring), HED Colour alpha in [0.95, 1.05] and beta in
  [-0.05, 0.05], Scaling (zoom) in [0.75, 1.25], Elastic alpha 100 / sigma 10, H (colour,
  contrast, brightness) factors in [0.75, 1.5], [0.75, 1.5], [0.75, 1.25], Blur sigma in
  [0, 2], Gaussian noise std in [0, 0.1]; 128 px contexts cropped to 100 px.
- ``fastscannet``: the transforms Fast ScanNet names (shift, rotation, flip, scale, colour).
  The paper gives no ranges for them; these are this package's: shift up to 8 px, zoom in
  [0.9, 1.1], HED sigma 0.05 (as Tellez) and colour / contrast / brightness in [0.9, 1.1].
- ``none``: the centre crop only.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError

Range = Tuple[float, float]


@dataclass(frozen=True)
class AugmentConfig:
    """Each transform's range (a transform whose range is a point is off). See the module
    docstring for what each does."""

    rot90: bool = False
    flip: bool = False
    shift_px: float = 0.0
    zoom: Range = (1.0, 1.0)
    elastic_alpha: float = 0.0
    elastic_sigma: float = 10.0
    hed_alpha: Range = (1.0, 1.0)
    hed_beta: Range = (0.0, 0.0)
    saturation: Range = (1.0, 1.0)
    contrast: Range = (1.0, 1.0)
    brightness: Range = (1.0, 1.0)
    blur_sigma: Range = (0.0, 0.0)
    noise_std: Range = (0.0, 0.0)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type is Range or f.name in ("zoom", "hed_alpha", "hed_beta", "saturation", "contrast", "brightness",
                                             "blur_sigma", "noise_std"):
                ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
                    isinstance(t, (int, float)) and math.isfinite(t) for t in v) and v[0] <= v[1]
                positive = f.name in ("zoom", "saturation", "contrast", "brightness", "hed_alpha")
                nonneg = f.name in ("blur_sigma", "noise_std")
                if not ok or (positive and v[0] <= 0) or (nonneg and v[0] < 0):
                    raise InvalidArgumentError(f"augmentation {f.name} must be a range (lo, hi) with lo <= hi"
                                               f"{' and lo > 0' if positive else ' and lo >= 0' if nonneg else ''}, "
                                               f"got {v!r}")
                object.__setattr__(self, f.name, (float(v[0]), float(v[1])))
            elif f.name in ("shift_px", "elastic_alpha", "elastic_sigma"):
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or \
                        (f.name == "elastic_sigma" and v <= 0):
                    raise InvalidArgumentError(f"augmentation {f.name} must be a finite number >= 0 "
                                               f"(sigma > 0), got {v!r}")

    @property
    def warps(self) -> bool:
        return self.zoom != (1.0, 1.0) or self.shift_px > 0 or self.elastic_alpha > 0


PRESETS = {
    "none": AugmentConfig(),
    "tellez_rcsehbg": AugmentConfig(rot90=True, flip=True, hed_alpha=(0.95, 1.05), hed_beta=(-0.05, 0.05),
                                    zoom=(0.75, 1.25), elastic_alpha=100.0, elastic_sigma=10.0,
                                    saturation=(0.75, 1.5), contrast=(0.75, 1.5), brightness=(0.75, 1.25),
                                    blur_sigma=(0.0, 2.0), noise_std=(0.0, 0.1)),
    "fastscannet": AugmentConfig(rot90=True, flip=True, shift_px=8.0, zoom=(0.9, 1.1), hed_alpha=(0.95, 1.05),
                                 hed_beta=(-0.05, 0.05), saturation=(0.9, 1.1), contrast=(0.9, 1.1),
                                 brightness=(0.9, 1.1)),
}
# the sides Tellez et al. read and crop to, and the margin read around a patch for the warps
TELLEZ_CONTEXT, TELLEZ_PATCH = 128, 100
TELLEZ_MARGIN = (TELLEZ_CONTEXT - TELLEZ_PATCH) / 2 / TELLEZ_PATCH  # 0.14 of the patch on each side


# (x, y) -> torch.rot90 by k of it, k = 0..3, as matrices
_TURNS = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]], dtype=torch.float64)


class Params(NamedTuple):
    """Per-image parameters of one batch (N images; CPU tensors, float64 unless said)."""

    k: torch.Tensor            # (N,) int64, quarter turns
    flip: torch.Tensor         # (N,) bool
    shift: torch.Tensor        # (N, 2) px (x, y)
    zoom: torch.Tensor         # (N,)
    hed_alpha: torch.Tensor    # (N, 3)
    hed_beta: torch.Tensor     # (N, 3)
    saturation: torch.Tensor   # (N,)
    contrast: torch.Tensor     # (N,)
    brightness: torch.Tensor   # (N,)
    blur_sigma: torch.Tensor   # (N,)
    noise_std: torch.Tensor    # (N,)
    elastic: Optional[torch.Tensor]  # (N, 2, P, P) float32 displacement in px (x, y), or None
    seed: int                  # for the additive noise


def _uniform(n: int, r: Range, g: torch.Generator, shape=()) -> torch.Tensor:
    u = torch.rand((n, *shape), generator=g, dtype=torch.float64)
    return r[0] + (r[1] - r[0]) * u


def _blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Per-image Gaussian blur (kornia), sigma (N,) px; sigma 0 leaves the image as it is."""
    from kornia.filters import gaussian_blur2d

    k = min(2 * math.ceil(3 * max_sigma) + 1, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
    s = sigma.clamp(min=1e-6).to(x.device, x.dtype)  # a delta kernel at 1e-6: exp(-1 / 2e-12) == 0
    return gaussian_blur2d(x, (k, k), torch.stack([s, s], dim=1), border_type="reflect")


def _gaussian_matrix(n: int, sigma: float, device, dtype) -> torch.Tensor:
    """(n, n): row i holds kornia's normalised Gaussian kernel (side 2 ceil(3 sigma) + 1)
    centred on i, cut at the ends, so ``G @ f`` is the 1-D Gaussian filter of ``f`` with
    zero padding. As matrices, the two passes of a wide (61-tap) kernel over a 100 px field
    are two small matmuls: ~25x faster on the CPU than kornia's depthwise convolution."""
    from kornia.filters import get_gaussian_kernel1d

    k = 2 * math.ceil(3 * sigma) + 1
    kern = get_gaussian_kernel1d(k, sigma, device=device, dtype=dtype).reshape(-1)
    offset = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None] + k // 2
    inside = (offset >= 0) & (offset < k)
    return torch.where(inside, kern[offset.clamp(0, k - 1)], torch.zeros((), device=device, dtype=dtype))


class Augment:
    """A batch augmentation: a preset name or an :class:`AugmentConfig`, and the output
    side ``patch`` (the centre of the input context).

    Example:
        >>> aug = Augment("tellez_rcsehbg", patch=100)
        >>> x = torch.randint(0, 256, (4, 3, 128, 128), dtype=torch.uint8)
        >>> aug(x, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 100, 100])
    """

    def __init__(self, config: Union[str, AugmentConfig] = "none", patch: Optional[int] = None, **overrides):
        if isinstance(config, str):
            if config not in PRESETS:
                raise InvalidArgumentError(f"unknown augmentation preset {config!r}; presets: {sorted(PRESETS)}")
            config = PRESETS[config]
        if not isinstance(config, AugmentConfig):
            raise InvalidArgumentError(f"config must be a preset name or an AugmentConfig, got {config!r}")
        self.config = replace(config, **overrides) if overrides else config
        self.patch = patch

    def sample(self, n: int, generator: Optional[torch.Generator] = None, patch: Optional[int] = None) -> Params:
        """Parameters for ``n`` images (reproducible with ``generator``)."""
        c, g = self.config, generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2 ** 62, (1,))))
        P = patch or self.patch
        k = torch.randint(0, 4 if c.rot90 else 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5 if c.flip else torch.zeros(n, dtype=torch.bool)
        shift = _uniform(n, (-c.shift_px, c.shift_px), g, (2,))
        zoom = _uniform(n, c.zoom, g)
        elastic = None
        if c.elastic_alpha > 0:
            if P is None:
                raise InvalidArgumentError("elastic deformation needs the patch side (Augment(..., patch=P))")
            elastic = torch.rand((n, 2, P, P), generator=g, dtype=torch.float32) * 2 - 1
        return Params(k, flip, shift, zoom, _uniform(n, c.hed_alpha, g, (3,)), _uniform(n, c.hed_beta, g, (3,)),
                      _uniform(n, c.saturation, g), _uniform(n, c.contrast, g), _uniform(n, c.brightness, g),
                      _uniform(n, c.blur_sigma, g), _uniform(n, c.noise_std, g), elastic,
                      int(torch.randint(0, 2 ** 62, (1,), generator=g)))

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], generator, self._patch(x)))

    def _patch(self, x: torch.Tensor) -> int:
        P = self.patch or x.shape[-1]
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2] or x.shape[-1] < P \
                or (x.shape[-1] - P) % 2:
            raise InvalidArgumentError(f"expected square (N, 3, S, S) images with S >= patch {P} and S - patch even, "
                                       f"got {tuple(x.shape)}")
        return P

    # ------------------------------------------------------------------ the steps
    def hed(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Step 1 (uint8 or float in, same out): :func:`pyfastscan.ops.hed_augment`."""
        from ..ops import hed_augment

        if self.config.hed_alpha == (1.0, 1.0) and self.config.hed_beta == (0.0, 0.0):
            return x
        return hed_augment(x, p.hed_alpha, p.hed_beta)

    def geometry(self, x: torch.Tensor, p: Params, P: int) -> torch.Tensor:
        """Step 2: float (N, 3, S, S) -> (N, 3, P, P). Without zoom, shift and elastic
        deformation, the exact quarter turns and mirror of the centre crop; with them, the
        turns and the mirror are folded into the one sampling grid (the same map as turning
        the context first: torch.rot90 turns about the centre of a square image)."""
        n, S = x.shape[0], x.shape[-1]
        m = (S - P) // 2
        if not self.config.warps:
            x = x[..., m:m + P, m:m + P]
            if self.config.rot90 and (p.k != 0).any():
                x = torch.stack([torch.rot90(x[i], int(p.k[i]), dims=(1, 2)) for i in range(n)]) if n else x
            if self.config.flip:
                x = torch.where(p.flip.to(x.device)[:, None, None, None], x.flip(3), x)
            return x
        dev, dt = x.device, x.dtype
        if n == 0:  # affine_grid refuses an empty batch
            return x.new_empty((0, 3, P, P))
        # in the turned and mirrored context: the mirror (x -> -x) first, then torch.rot90 by
        # k ((x, y) reads (-y, x), k times), as one signed permutation M per image. Output
        # pixel q (px from the patch centre) samples context pixel M (q / zoom + shift + d(q))
        # from the context's centre, d the elastic displacement; in grid_sample's units
        # (align_corners=False: x_norm = 2 x_px / S from the centre, output u = 2 q / P)
        # that is the affine map theta = [M P / (S zoom) | 2 M shift / S] of u, plus 2 M d / S.
        M = _TURNS[p.k if self.config.rot90 else torch.zeros_like(p.k)]  # float64, CPU: (n, 2, 2)
        if self.config.flip:
            M = M * torch.stack([torch.where(p.flip, -1.0, 1.0).double(), torch.ones(n, dtype=torch.float64)],
                                dim=1)[:, None, :]  # column x mirrored
        theta = torch.cat([M * (P / S / p.zoom)[:, None, None], (2 / S) * (M @ p.shift[:, :, None])], dim=2)
        norm = F.affine_grid(theta.to(dev, dt), [n, 3, P, P], align_corners=False)  # (n, P, P, 2) x, y
        if p.elastic is not None:
            g = _gaussian_matrix(P, self.config.elastic_sigma, dev, dt)
            disp = (g @ p.elastic.to(dev, dt) @ g.T).permute(0, 2, 3, 1)  # the separable Gaussian, zero beyond the field
            Md = (2 * self.config.elastic_alpha / S) * M.to(dev, dt)
            norm = norm + torch.bmm(disp.reshape(n, P * P, 2), Md.transpose(1, 2)).reshape(n, P, P, 2)
        return F.grid_sample(x, norm, mode="bilinear", padding_mode="reflection", align_corners=False)

    def colour(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Step 3: colour (saturation), contrast, brightness, each clipped to [0, 1]; in
        place when ``x`` is contiguous."""
        c = self.config
        dev, dt = x.device, x.dtype
        shape, n = x.shape, x.shape[0]
        # as (n, 3, H W): per-image factors broadcast over long contiguous rows (over (n, 3,
        # H, W) the inner loops are W long: ~3x the time)
        x = x.reshape(n, 3, shape[2] * shape[3])
        w = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=dt)

        def factor(v):
            return v.to(dev, dt)[:, None, None]

        # in place (apply hands over a tensor of its own): a new tensor of this size costs
        # page faults as large as the arithmetic
        if c.saturation != (1.0, 1.0):  # grey + f (x - grey), grey = 0.299 R + 0.587 G + 0.114 B
            grey = torch.matmul(w, x)[:, None]
            x.sub_(grey).mul_(factor(p.saturation)).add_(grey).clamp_(0, 1)
        if c.contrast != (1.0, 1.0):
            mean = torch.matmul(w, x).mean(1)[:, None, None]
            x.sub_(mean).mul_(factor(p.contrast)).add_(mean).clamp_(0, 1)
        if c.brightness != (1.0, 1.0):
            x.mul_(factor(p.brightness)).clamp_(0, 1)
        return x.reshape(shape)

    def blur(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Step 4."""
        if self.config.blur_sigma[1] <= 0:
            return x
        return _blur(x, p.blur_sigma, self.config.blur_sigma[1]).clamp(0, 1)  # the kernel sums to 1 within rounding

    def noise(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Step 5."""
        if self.config.noise_std[1] <= 0:
            return x
        g = torch.Generator(device=x.device).manual_seed(p.seed)
        z = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return (x + p.noise_std.to(x.device, x.dtype)[:, None, None, None] * z).clamp(0, 1)

    def apply(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Augment ``x`` (uint8 (N, 3, S, S) in [0, 255] or float in [0, 1]) with ``p``:
        float32 (N, 3, P, P) in [0, 1] on ``x``'s device."""
        P = self._patch(x)
        given = x
        x = self.hed(x, p)
        # a tensor of its own: the later steps may work in place
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=x is given)
        x = self.geometry(x, p, P)
        x = self.colour(x, p)
        x = self.blur(x, p)
        return self.noise(x, p).contiguous()
