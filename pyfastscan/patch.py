"""Patch mode: any classifier run unchanged on every patch of a ROI, at a fixed grid.

    scanner = PatchModel(resnet, patch=224, step=112, precision="bf16")
    heat = scanner(roi)            # (N, K, Ho, Wo): the classifier on each patch, batched

DESIGN.md 6.2: map cell (i, j) is the classifier's output on the patch whose top-left
corner is (i, j) * step. Dense mode (``to_dense``) computes it with a converted network
when the network is padding-free; patch mode computes it for any network (padding, global
pooling, attention...) by gathering the patches batch by batch from a strided view of the
ROI. A :class:`PatchModel` has the interface of a :class:`~pyfastscan.dense.DenseModel`
(geometry, plan, precision, input_dtype, ends_with_softmax, activation_bytes,
multiply_adds), so the scan engine runs either.
"""
import copy
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dense import PRECISIONS, Geometry
from .errors import InvalidArgumentError
from .validate import check, check_optional
from .models.files import check_normalize

DEFAULT_MEMORY = 1 << 30  # bytes for one batch (patches + the model's activations)
MAX_BATCH = 256


def _in_channels(model: nn.Module, normalize) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None:
        return first.in_channels
    return len(normalize[0]) if normalize is not None else 3


def _count_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-adds of one Conv2d (out elements x in_channels / groups x kernel area) or
    Linear (out elements x in_features); 0 for other modules."""
    if isinstance(module, nn.Conv2d):
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


class _Probe:
    """One forward pass of ``model`` on ``x`` with hooks on every module: output, Conv2d +
    Linear multiply-adds (and the Linear share), Conv2d calls, and the peak bytes of the
    module inputs and outputs alive at once (distinct storages, ``x`` excluded; checked
    after every module, when its input and output are both held)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, measure_memory: bool = True):
        self.macs, self.linear_macs, self.convs, self.peak = 0, 0, 0, 0
        self._seen = {}  # id -> weakref of every tensor a module received or returned
        self._exclude = {x.untyped_storage().data_ptr()} if measure_memory else set()
        self._memory = measure_memory
        handles = []
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(self._pre))
            handles.append(m.register_forward_hook(self._post))
        try:
            with torch.inference_mode():
                self.out = model(x)
        finally:
            for h in handles:
                h.remove()

    def _track(self, obj):
        tensors = obj if isinstance(obj, (tuple, list)) else (obj,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in self._seen:
                self._seen[id(t)] = weakref.ref(t)

    def _pre(self, module, args):
        if self._memory:
            self._track(args)

    def _post(self, module, args, out):
        if isinstance(out, torch.Tensor):
            macs = _count_macs(module, out)
            self.macs += macs
            self.convs += isinstance(module, nn.Conv2d)
            self.linear_macs += macs if isinstance(module, nn.Linear) else 0
        if not self._memory:
            return
        self._track(out)
        storages = {}
        for key, ref in list(self._seen.items()):
            t = ref()
            if t is None:
                del self._seen[key]
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in self._exclude:
                storages[s.data_ptr()] = s.nbytes()
        self.peak = max(self.peak, sum(storages.values()))


def _blocks(k0: int, k1: int, ny: int, nx: int):
    """Patches k0 .. k1 - 1 (in map order over N images of ny x nx cells) as rectangles of
    the map: parts of one row, or runs of whole rows; at most three per image.
    Yields (image, row slice, column slice, offset from k0, count)."""
    k = k0
    while k < k1:
        img, r = divmod(k, ny * nx)
        i, j = divmod(r, nx)
        left = k1 - k
        if j > 0 or left < nx:
            count = min(nx - j, left)
            yield img, slice(i, i + 1), slice(j, j + count), k - k0, count
        else:
            rows = min(left // nx, ny - i)
            count = rows * nx
            yield img, slice(i, i + rows), slice(0, nx), k - k0, count
        k += count


class PatchModel(nn.Module):
    """The classifier ``model`` on every patch of a ROI: the scanner of patch mode.

    Output (i, j) is ``model(normalize(x[..., i*step : i*step+patch, j*step : j*step+patch]))``,
    the model's logits (a model returning (B, K) or (B, K, 1, 1)). Patches are copied from a
    strided view of the ROI into one channels_last batch at a time, so memory holds one
    batch, never all the patches.

    Args:
        model: any classifier of (B, C, patch, patch) inputs. It is not modified: the
            PatchModel holds a frozen copy in eval mode (``.model``).
        patch: patch side in pixels.
        step: distance between neighbouring patches (the map's step).
        precision: "fp32" (the model's own dtype) or "bf16" (model and batches in
            bfloat16 channels_last, the map returned as float32), as in ``to_dense``.
        batch_size: patches per forward pass; default the largest power of two <= 256
            whose batch (patches + the model's activations) fits ``memory``.
        normalize: (mean, std) per channel, applied to the ROI before the patches are cut.
        memory: byte budget of one batch for the default batch size (default 1 GiB).

    Attributes:
        geometry: ``Geometry(patch, stride=step, alpha=1)`` (so ``geometry.step == step``).
        plan: "patch".

    Example:
        >>> import torch
        >>> from pyfastscan.models.resnet import resnet18
        >>> scanner = PatchModel(resnet18(num_classes=2, width=8), patch=64, step=16, batch_size=8)
        >>> scanner(torch.rand(1, 3, 100, 100)).shape
        torch.Size([1, 2, 3, 3])
        >>> scanner.geometry.input_side(3), scanner.multiply_adds(100) == 9 * scanner.multiply_adds(64)
        (96, True)
    """

    def __init__(self, model: nn.Module, patch: int, step: int, *, precision: str = "fp32",
                 batch_size: Optional[int] = None, normalize=None, memory: Optional[int] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        patch, step = check("patch", patch), check("step", step)
        if precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        batch_size, memory = check_optional("batch_size", batch_size), check_optional("memory", memory)
        self.normalize = check_normalize(normalize)
        net = copy.deepcopy(model).eval().requires_grad_(False)
        if precision == "bf16":
            net = net.to(torch.bfloat16)
        self.model = net.to(memory_format=torch.channels_last)
        self.geometry = Geometry(patch, step, 1)
        self.plan = "patch"
        self.precision = precision
        self.in_channels = _in_channels(self.model, self.normalize)
        if self.normalize is not None and len(self.normalize[0]) != self.in_channels:
            raise InvalidArgumentError(f"normalize has {len(self.normalize[0])} channels, the model takes "
                                       f"{self.in_channels}")
        self.memory = memory if memory is not None else DEFAULT_MEMORY
        self._probe_cache = None
        self._batch_size = batch_size

    # ------------------------------------------------------------------ the probe (one patch)

    @property
    def _run_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else self.input_dtype

    def _probe(self) -> dict:
        """Output classes and ndim, multiply-adds and peak activation bytes of one patch
        (measured once, on zeros, with hooks; cached)."""
        if self._probe_cache is None:
            p, c = self.geometry.patch, self.in_channels
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            x = torch.zeros(1, c, p, p, dtype=self._run_dtype, device=device).contiguous(
                memory_format=torch.channels_last)
            try:
                probe = _Probe(self.model, x)
            except Exception as exc:
                raise InvalidArgumentError(f"the model fails on one ({c}, {p}, {p}) patch: {exc}") from exc
            out = probe.out
            if not isinstance(out, torch.Tensor) or not (out.dim() == 2 or (out.dim() == 4 and out.shape[-2:] == (1, 1))):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InvalidArgumentError(f"patch mode needs a classifier returning (B, K) or (B, K, 1, 1) logits; "
                                           f"on a (1, {c}, {p}, {p}) patch the model returned {shape}")
            self._probe_cache = dict(classes=out.shape[1], ndim=out.dim(), macs=probe.macs, peak=probe.peak)
        return self._probe_cache

    @property
    def batch_size(self) -> int:
        """Patches per forward pass (given, or the largest power of two <= 256 whose batch
        fits ``memory``)."""
        if self._batch_size is None:
            per_patch = self._patch_bytes()
            b = MAX_BATCH
            while b > 1 and b * per_patch > self.memory:
                b //= 2
            self._batch_size = b
        return self._batch_size

    def _patch_bytes(self) -> int:
        """Bytes one patch adds to a batch: its copy in the batch + the model's activations."""
        item = torch.empty(0, dtype=self._run_dtype).element_size()
        return self.in_channels * self.geometry.patch ** 2 * item + self._probe()["peak"]

    # ------------------------------------------------------------------ DenseModel's interface

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype to give forward: the parameters' (float32 for bf16, cast inside forward)."""
        param = next(self.model.parameters(), None)
        return torch.float32 if param is None or self.precision == "bf16" else param.dtype

    @property
    def ends_with_softmax(self) -> bool:
        """True when the model's last module is a Softmax over the class dimension (its
        outputs are probabilities already)."""
        leaves = [m for m in self.model.modules() if not list(m.children())]
        last = leaves[-1] if leaves else None
        if not isinstance(last, nn.Softmax):
            return False
        ndim = self._probe()["ndim"]
        dim = last.dim if last.dim is not None else (0 if ndim in (0, 1, 3) else 1)  # nn.Softmax's implicit dim
        return dim % ndim == 1

    def activation_bytes(self, side: int) -> int:
        """Peak bytes one forward pass on a side x side ROI (per image) holds besides the
        ROI: the batch of patches, the model's activations for that batch (the one-patch
        peak measured by :class:`_Probe`, times the batch), the normalised ROI when
        ``normalize`` is set, and the output map."""
        cells = self.geometry.output_side(side) ** 2
        b = min(self.batch_size, max(cells, 1))
        in_item = torch.empty(0, dtype=self.input_dtype).element_size()
        out_item = 4 if self.precision == "bf16" else in_item
        norm = self.in_channels * side * side * in_item if self.normalize is not None else 0
        return b * self._patch_bytes() + norm + self._probe()["classes"] * cells * out_item

    def multiply_adds(self, side: int) -> int:
        """Conv2d + Linear multiply-adds of a forward pass on a side x side ROI (per image):
        the patches times one patch's count (hooks on one patch)."""
        return self.geometry.output_side(side) ** 2 * self._probe()["macs"]

    def compile_layers(self, **kwargs) -> "PatchModel":
        """torch.compile the classifier (kwargs go to torch.compile); returns self. Kept
        outside the module's registry (see :meth:`DenseModel.compile_layers`)."""
        self.__dict__["_compiled"] = torch.compile(self.model, **kwargs)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        p, s = g.patch, g.step
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or min(x.shape[-2:]) < p or \
                x.shape[1] != self.in_channels or not x.is_floating_point():
            shape = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidArgumentError(f"input must be (N, {self.in_channels}, H, W) float with H, W >= the patch "
                                       f"size {p}, got {shape}")
        if self.normalize is not None:
            mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
                         for v in self.normalize)
            x = (x - mean) / std
        n, c = x.shape[:2]
        ny, nx = g.output_side(x.shape[2]), g.output_side(x.shape[3])
        total = n * ny * nx
        classes = self._probe()["classes"]
        out_dtype = torch.float32 if self.precision == "bf16" else self.input_dtype
        out = torch.empty(n, classes, ny, nx, dtype=out_dtype, device=x.device)
        if total == 0:
            return out
        view = x.unfold(2, p, s).unfold(3, p, s)  # (N, C, ny, nx, p, p), no copy
        b_max = min(self.batch_size, total)
        buf = torch.empty(b_max, c, p, p, dtype=self._run_dtype, device=x.device, memory_format=torch.channels_last)
        for k0 in range(0, total, b_max):
            k1 = min(k0 + b_max, total)
            blocks = list(_blocks(k0, k1, ny, nx))
            for img, rows, cols, off, count in blocks:  # one strided copy per block
                buf[off:off + count].unflatten(0, (rows.stop - rows.start, cols.stop - cols.start)).copy_(
                    view[img, :, rows, cols].permute(1, 2, 0, 3, 4))
            run = self.__dict__.get("_compiled")
            y = (self.model if run is None else run)(buf[:k1 - k0])
            if y.shape != (k1 - k0, classes) and y.shape != (k1 - k0, classes, 1, 1):
                raise InvalidArgumentError(f"the model returned {tuple(y.shape)} for {k1 - k0} patches; expected "
                                           f"({k1 - k0}, {classes}) or ({k1 - k0}, {classes}, 1, 1)")
            y = y.reshape(k1 - k0, classes)
            for img, rows, cols, off, count in blocks:
                out[img, :, rows, cols] = y[off:off + count].unflatten(
                    0, (rows.stop - rows.start, cols.stop - cols.start)).permute(2, 0, 1)
        return out

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"patch={g.patch}, step={g.step}, plan='patch', precision={self.precision!r}, "
                f"batch_size={self._batch_size}, normalize={self.normalize}")


class _Stop(Exception):
    """Raised by a hook to end a traced forward pass early."""


class _SpatialConv(nn.Module):
    """Stand-in for a Conv2d in :func:`dense_savings`' trace: the same kernel, stride,
    padding and dilation on the channel sum, one channel out (the output's spatial shape
    for a fraction of the work and memory)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        # plain attributes (no submodule, no buffer): the trace's .float() leaves them alone
        self.args = (conv.stride, conv.padding, conv.dilation)
        self.macs_per_output = conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
        self.kernel = torch.ones(1, 1, *conv.kernel_size)

    def forward(self, x):
        return F.conv2d(x.sum(1, keepdim=True), self.kernel, None, *self.args)


def _trunk_macs(model: nn.Module, channels: int, side: int, n_convs: int):
    """(Conv2d multiply-adds, side of the last Conv2d output) of ``model`` on one side x side
    input, traced with :class:`_SpatialConv` stand-ins (BatchNorm as Identity; weights of
    convolutions not copied) and stopped after ``n_convs`` convolutions; a failure before
    that ends the count where it happened."""
    memo = {}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            memo[id(m)] = _SpatialConv(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            memo[id(m)] = nn.Identity()
    trace = copy.deepcopy(model, memo).float().eval()
    counts = {"macs": 0, "side": None, "convs": 0}

    def hook(module, args, out):
        counts["macs"] += out.shape[-2] * out.shape[-1] * module.macs_per_output
        counts["side"], counts["convs"] = out.shape[-1], counts["convs"] + 1
        if counts["convs"] == n_convs:
            raise _Stop

    for m in trace.modules():
        if isinstance(m, _SpatialConv):
            m.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            trace(torch.zeros(1, channels, side, side))
    except _Stop:
        pass
    except (RuntimeError, ValueError, TypeError):
        pass  # e.g. a Flatten + Linear head sized for one patch: count what ran
    return counts["macs"], counts["side"]


def dense_savings(model: nn.Module, patch: int, step: int, side: int) -> float:
    """Multiply-add ratio patch mode / fully convolutional for one side x side ROI.

    Estimates what a padding-free (dense-convertible) version of ``model`` would save:

    * patch mode = cells * (Conv2d + Linear multiply-adds of one patch, counted with hooks
      on a real forward pass), cells = ((side - patch) // step + 1) ** 2;
    * fully convolutional = T * max(1, S / step) ** 2 + cells * (Linear multiply-adds of one
      patch). T = the Conv2d multiply-adds of the model's convolutional trunk run once on
      the whole side x side input (every Conv2d that runs on one patch, traced on the ROI
      for shapes only); S = the stride of the last Conv2d's output, measured as
      (side - patch) / (its side on the ROI - its side on one patch). The factor
      (S / step) ** 2 counts one trunk per phase when the grid is finer than the network's
      stride (as shift-and-stitch would; an upper bound on a dense model's cost), and the
      Linear head is counted as a 1x1 convolution at every cell.

    Args:
        model: the classifier (not modified).
        patch, step: the patch grid.
        side: ROI side in pixels (>= patch).
    Returns:
        The ratio (> 1 when a dense model would need fewer multiply-adds).

    Example:
        >>> from pyfastscan.models.resnet import resnet18
        >>> round(dense_savings(resnet18(), 224, 32, 224 + 63 * 32))
        41
    """
    patch, step, side = check("patch", patch), check("step", step), check("side", side)
    if side < patch:
        raise InvalidArgumentError(f"side must be >= patch ({patch}), got {side}")
    c = _in_channels(model, None)
    param = next(model.parameters(), None)
    x = torch.zeros(1, c, patch, patch, dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else None)
    was_training = model.training
    try:
        model.eval()
        probe = _Probe(model, x, measure_memory=False)
    finally:
        model.train(was_training)
    _, side_one = _trunk_macs(model, c, patch, probe.convs)
    trunk, side_big = _trunk_macs(model, c, side, probe.convs)
    cells = ((side - patch) // step + 1) ** 2
    patch_macs = cells * probe.macs
    scale = 1.0
    if side_one is not None and side_big is not None and side_big > side_one:
        scale = max(1.0, (side - patch) / (side_big - side_one) / step) ** 2
    dense_macs = trunk * scale + cells * probe.linear_macs
    return patch_macs / dense_macs if dense_macs else math.inf
