"""Weights files that describe themselves (DESIGN.md 6.3).

    pyfastscan.save_model(model, "tumour.safetensors", arch="vgg16_fcn", arch_kwargs={"num_classes": 2},
                          classes=["normal", "tumour"], positive_class="tumour", mpp=0.243)
    model = pyfastscan.load_model("tumour.safetensors")      # rebuilt from the file alone
    model.pyfastscan_card                                       # ModelCard: how to scan it

A safetensors file whose metadata holds the architecture (a registry name and its
arguments), the class names and the positive class, the resolution it was trained at,
the input normalisation, the patch grid for patch mode and the package version. Nothing
in it is code: the architecture is rebuilt from the registry.
"""
import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import InvalidArgumentError
from ..weights import WeightsError, load_weights
from .registry import create, get_entry

PREFIX = "pyfastscan."
CARD_ATTR = "pyfastscan_card"  # the attribute load_model sets on the module it returns


@dataclass(frozen=True)
class ModelCard:
    """How a trained classifier must be scanned: what a self-describing weights file says.

    Attributes:
        arch: registry name of the architecture (``pyfastscan.models.list_models()``).
        arch_kwargs: the builder's arguments.
        classes: class names, one per output channel.
        positive_class: index into ``classes`` of the class the heat map shows.
        mpp: the resolution it was trained at, um/px (the default scan resolution).
        normalize: (mean, std) per RGB channel applied to the [0, 1] input, or None.
        patch, stride: the patch side and the step of the patch grid at alpha 1 (patch
            mode); for padding-free networks the geometry of their layers.
        version: the pyfastscan version that wrote the file.
        extra: any other metadata of the file (kept, not interpreted).
    """

    arch: str
    arch_kwargs: Dict = field(default_factory=dict)
    classes: Tuple[str, ...] = ()
    positive_class: int = 1
    mpp: Optional[float] = None
    normalize: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    patch: Optional[int] = None
    stride: Optional[int] = None
    version: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> Dict[str, str]:
        """The safetensors metadata (strings only) for this card."""
        meta = dict(self.extra)
        meta.update({
            PREFIX + "arch": self.arch,
            PREFIX + "arch_kwargs": json.dumps(self.arch_kwargs, sort_keys=True),
            PREFIX + "classes": json.dumps(list(self.classes)),
            PREFIX + "positive_class": str(self.positive_class),
            PREFIX + "mpp": "" if self.mpp is None else repr(float(self.mpp)),
            PREFIX + "normalize": json.dumps(None if self.normalize is None else
                                             {"mean": list(self.normalize[0]), "std": list(self.normalize[1])}),
            PREFIX + "patch": "" if self.patch is None else str(self.patch),
            PREFIX + "stride": "" if self.stride is None else str(self.stride),
            PREFIX + "version": self.version or "",
        })
        return meta

    @classmethod
    def from_metadata(cls, meta: Dict[str, str], source: str = "metadata") -> "ModelCard":
        """Parse (and validate) a card from safetensors metadata; errors name the key."""
        def get(key, parse, default=None):
            raw = meta.get(PREFIX + key)
            if raw is None or raw == "":
                return default
            try:
                return parse(raw)
            except (ValueError, TypeError, InvalidArgumentError) as exc:
                raise WeightsError(f"{source}: metadata {PREFIX}{key}={raw!r} is invalid: {exc}") from None

        arch = meta.get(PREFIX + "arch")
        if not arch:
            raise WeightsError(f"{source}: no {PREFIX}arch in the metadata")
        extra = {k: v for k, v in meta.items() if not k.startswith(PREFIX)}
        card = cls(arch=arch, arch_kwargs=get("arch_kwargs", _json_dict, {}), classes=get("classes", _json_names, ()),
                   positive_class=get("positive_class", _int, 1), mpp=get("mpp", _positive_float),
                   normalize=get("normalize", _json_normalize), patch=get("patch", _positive_int),
                   stride=get("stride", _positive_int), version=meta.get(PREFIX + "version") or None, extra=extra)
        if card.classes and not 0 <= card.positive_class < len(card.classes):
            raise WeightsError(f"{source}: {PREFIX}positive_class={card.positive_class} is not an index into "
                               f"{PREFIX}classes {list(card.classes)}")
        return card


def _int(raw) -> int:
    v = int(raw)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def _positive_int(raw) -> int:
    v = int(raw)
    if v < 1:
        raise ValueError("must be a positive integer")
    return v


def _positive_float(raw) -> float:
    v = float(raw)
    if not math.isfinite(v) or v <= 0:
        raise ValueError("must be a positive finite number")
    return v


def _json_dict(raw) -> dict:
    v = json.loads(raw)
    if not isinstance(v, dict):
        raise ValueError("must be a JSON object")
    return v


def _json_names(raw) -> Tuple[str, ...]:
    v = json.loads(raw)
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise ValueError("must be a JSON list of strings")
    return tuple(v)


def _json_normalize(raw):
    v = json.loads(raw)
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != {"mean", "std"}:
        raise ValueError('must be null or {"mean": [...], "std": [...]}')
    return check_normalize((v["mean"], v["std"]))


def check_normalize(normalize) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``normalize`` as ((mean...), (std...)) of finite floats with std > 0, or None.
    Accepts a (mean, std) pair or a {"mean": ..., "std": ...} mapping."""
    if normalize is None:
        return None
    if isinstance(normalize, dict):
        normalize = (normalize.get("mean"), normalize.get("std"))
    try:
        mean, std = normalize
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"normalize must be (mean, std) with one number per channel, got {normalize!r}") \
            from None
    if len(mean) != len(std) or not mean:
        raise InvalidArgumentError(f"normalize: mean {mean} and std {std} must have the same, nonzero length")
    if not all(math.isfinite(v) for v in mean + std) or not all(s > 0 for s in std):
        raise InvalidArgumentError(f"normalize: mean must be finite and std positive, got mean {mean}, std {std}")
    return mean, std


def read_card(path) -> Optional[ModelCard]:
    """The :class:`ModelCard` of a weights file, or None when the file does not describe
    itself (a bare state dict, a PyTorch checkpoint). Reads only the header."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    return ModelCard.from_metadata(meta, str(path)) if meta.get(PREFIX + "arch") else None


def _check_state_fits(model: nn.Module, arch: str, arch_kwargs: dict) -> None:
    """The model's parameters must be exactly those of the architecture it is saved as."""
    ref = create(arch, **arch_kwargs).state_dict()
    own = model.state_dict()
    problems = [f"missing {k}" for k in ref if k not in own] + [f"unexpected {k}" for k in own if k not in ref]
    problems += [f"{k}: model has {tuple(own[k].shape)}, {arch}({_kw(arch_kwargs)}) has {tuple(ref[k].shape)}"
                 for k in ref if k in own and own[k].shape != ref[k].shape]
    if problems:
        raise InvalidArgumentError(f"the model is not a {arch}({_kw(arch_kwargs)}): " + "; ".join(problems[:8])
                                   + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def save_model(model: nn.Module, path, *, arch: str, arch_kwargs: Optional[dict] = None,
               classes: Sequence[str], positive_class: Union[int, str], mpp: float, normalize=None,
               patch: Optional[int] = None, stride: Optional[int] = None,
               extra: Optional[Dict[str, str]] = None) -> ModelCard:
    """Write ``model``'s weights with everything needed to scan it (DESIGN.md 6.3).

    Args:
        model: the trained classifier; its parameters must be those of
            ``pyfastscan.models.create(arch, **arch_kwargs)`` (checked).
        path: the .safetensors file to write (atomically: a crash leaves the old file).
        arch, arch_kwargs: registry name and builder arguments.
        classes: one name per output channel.
        positive_class: the class the heat map shows, by name or index.
        mpp: the resolution the model was trained at, um/px.
        normalize: (mean, std) per channel applied to the [0, 1] RGB input, or None.
        patch, stride: the patch grid for patch mode; default the registry entry's, or the
            geometry of a padding-free network.
        extra: other string metadata to keep (e.g. a note).
    Returns:
        The :class:`ModelCard` written.
    """
    from .._version import __version__
    from ..io.files import atomic_write

    arch_kwargs = dict(arch_kwargs or {})
    entry = get_entry(arch)
    _check_state_fits(model, arch, arch_kwargs)
    classes = tuple(str(c) for c in classes)
    if isinstance(positive_class, str):
        if positive_class not in classes:
            raise InvalidArgumentError(f"positive_class {positive_class!r} is not one of the classes {list(classes)}")
        positive_class = classes.index(positive_class)
    if isinstance(positive_class, bool) or not isinstance(positive_class, int) or \
            not 0 <= positive_class < max(len(classes), 1):
        raise InvalidArgumentError(f"positive_class must be an index into classes {list(classes)}, "
                                   f"got {positive_class!r}")
    try:
        mpp = _positive_float(mpp)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"mpp must be a positive number (um/px), got {mpp!r}") from None
    if patch is None or stride is None:  # each one not given: the registry's, else the layers' geometry
        default_patch, default_stride = entry.patch, entry.stride
        if default_patch is None:
            from ..dense import geometry

            try:
                g = geometry(model)
                default_patch, default_stride = g.patch, g.stride
            except InvalidArgumentError:
                pass  # not padding-free: patch mode will need --patch / --stride
        patch = default_patch if patch is None else patch
        stride = default_stride if stride is None else stride
    for label, v in (("patch", patch), ("stride", stride)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidArgumentError(f"{label} must be a positive int, got {v!r}")
    extra = {str(k): str(v) for k, v in (extra or {}).items()}
    clash = [k for k in extra if k.startswith(PREFIX)]
    if clash:
        raise InvalidArgumentError(f"extra metadata keys may not start with {PREFIX!r} (the card's own): {clash}")
    try:
        arch_kwargs = json.loads(json.dumps(arch_kwargs))  # what the file will hold, tuples as lists
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"arch_kwargs must be JSON values: {exc}") from None
    card = ModelCard(arch, arch_kwargs, classes, positive_class, mpp, check_normalize(normalize), patch, stride,
                     __version__, extra)
    meta = card.to_metadata()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return card


def load_model(path, *, arch: Optional[str] = None, arch_kwargs: Optional[dict] = None,
               strict: bool = True) -> nn.Module:
    """Rebuild a classifier from a weights file: the architecture from its metadata (or
    ``arch``), the weights loaded with :func:`pyfastscan.load_weights` (safe formats only).

    The returned module is in eval mode and carries the file's :class:`ModelCard` as
    ``model.pyfastscan_card`` (for a bare state dict, a card with only ``arch``), which
    ``scan_slide`` reads for the positive class, normalisation, resolution and patch grid.

    Args:
        path: .safetensors (self-describing or bare) or a PyTorch checkpoint.
        arch, arch_kwargs: the architecture, for files that do not name theirs (bare
            state dicts, torchvision checkpoints); given for a file that names another,
            they win with a warning.
        strict: see :func:`pyfastscan.load_weights`.
    Raises:
        WeightsError: unreadable file, no architecture known, or weights that do not fit.
    """
    path = Path(path)
    card = read_card(path)
    if arch is None and card is None:
        raise WeightsError(f"{path} does not say which architecture it holds (no {PREFIX}arch metadata): "
                           "pass arch= (CLI: --arch NAME; `pyfastscan models` lists them)")
    if card is None:  # a bare file: the patch grid the architecture is registered with, nothing else
        entry = get_entry(arch)
        card = ModelCard(arch=arch, arch_kwargs=dict(arch_kwargs or {}), patch=entry.patch, stride=entry.stride)
    elif arch is not None and arch != card.arch:
        warnings.warn(f"{path}: arch {arch!r} overrides the file's {card.arch!r}", stacklevel=2)
        card = replace(card, arch=arch, arch_kwargs=dict(arch_kwargs or {}))
    elif arch_kwargs is not None and dict(arch_kwargs) != card.arch_kwargs:
        warnings.warn(f"{path}: arch_kwargs {arch_kwargs} override the file's {card.arch_kwargs}", stacklevel=2)
        card = replace(card, arch_kwargs=dict(arch_kwargs))
    try:
        model = create(card.arch, **card.arch_kwargs)
    except InvalidArgumentError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    load_weights(model, path, strict=strict)
    model.eval()
    setattr(model, CARD_ATTR, card)
    return model


def card_of(model: nn.Module) -> Optional[ModelCard]:
    """The :class:`ModelCard` ``load_model`` attached to ``model``, or None."""
    card = getattr(model, CARD_ATTR, None)
    return card if isinstance(card, ModelCard) else None


def override_card(card: ModelCard, source: str = "option", **values) -> ModelCard:
    """``card`` with the given fields replaced (None values are ignored), warning for each
    one that contradicts what the file said."""
    changes = {k: v for k, v in values.items() if v is not None}
    for k, v in changes.items():
        old = getattr(card, k)
        if old is not None and old != v and old != ():
            warnings.warn(f"{source} {k}={v!r} overrides the weights file's {k}={old!r}", stacklevel=2)
    return replace(card, **changes)

