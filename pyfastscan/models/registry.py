"""The model registry: architectures by name, for weights files that name theirs.

    >>> from pyfastscan import models
    >>> "vgg16_fcn" in models.list_models()
    True
    >>> net = models.create("tellez_cnn", gamma=0.25)
    >>> models.get_entry("tellez_cnn").dense
    True

A user architecture joins with ``@register_model``; a third-party package joins through
the ``pyfastscan.models`` entry-point group (each entry point names a builder, which is
registered under the entry point's name, or a module that registers its builders when
imported):

    # pyproject.toml of a third-party package
    [project.entry-points."pyfastscan.models"]
    my_net = "my_package.nets:my_net"

The registry is documented API: a process-wide table, filled by the built-in
architectures, by ``register_model`` calls and, on first look-up, by the entry points.
"""
import inspect
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch import nn

from ..errors import InvalidArgumentError

ENTRY_POINT_GROUP = "pyfastscan.models"


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture.

    Attributes:
        name: the registry name (what ``pyfastscan.arch`` holds in a weights file).
        builder: ``builder(**arch_kwargs) -> nn.Module``.
        patch, stride: the scan grid for patch mode (patch side and the step between
            neighbouring patches at alpha 1); None for padding-free networks, whose
            geometry is derived from their layers.
        mpp: the resolution the architecture is usually trained at (um/px), or None.
        dense: whether ``to_dense`` converts it (padding-free), as registered.
        description: one line for ``pyfastscan models``.
    """

    name: str
    builder: Callable[..., nn.Module]
    patch: Optional[int] = None
    stride: Optional[int] = None
    mpp: Optional[float] = None
    dense: bool = True
    description: str = ""


_REGISTRY: Dict[str, ModelEntry] = {}
_entry_points_loaded = False


def register_model(builder: Optional[Callable] = None, *, name: Optional[str] = None, patch: Optional[int] = None,
                   stride: Optional[int] = None, mpp: Optional[float] = None, dense: bool = True,
                   description: Optional[str] = None, overwrite: bool = False):
    """Register an architecture builder under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with options
    (``@register_model(patch=224, stride=32, dense=False)`` for a padded network scanned in
    patch mode). Returns the builder unchanged.

    Raises:
        InvalidArgumentError: the name is taken (unless ``overwrite``), or patch / stride
            are not positive integers.
    """
    def add(fn):
        key = name or fn.__name__
        if not callable(fn):
            raise InvalidArgumentError(f"register_model needs a callable builder, got {fn!r}")
        for label, v in (("patch", patch), ("stride", stride)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidArgumentError(f"register_model({key!r}): {label} must be a positive int, got {v!r}")
        if key in _REGISTRY and not overwrite and _REGISTRY[key].builder is not fn:
            raise InvalidArgumentError(f"a model named {key!r} is already registered "
                                       f"({_describe(_REGISTRY[key].builder)}); pass overwrite=True to replace it")
        doc = description if description is not None else _first_sentence(inspect.getdoc(fn) or "")
        _REGISTRY[key] = ModelEntry(key, fn, patch, stride, mpp, dense, doc)
        return fn

    return add(builder) if builder is not None else add


def _first_sentence(doc: str) -> str:
    """The docstring's first sentence (its first paragraph up to ". " or ":")."""
    para = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<!\bal)\.\s+(?=[A-Z])|:\s", para)[0].rstrip(".")


def _describe(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not break the package: say so, go on
            import warnings

            warnings.warn(f"pyfastscan: cannot load model entry point {ep.name!r} ({ep.value}): "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)
            continue
        if callable(obj) and not inspect.ismodule(obj) and ep.name not in _REGISTRY:
            register_model(obj, name=ep.name)


def list_models() -> List[str]:
    """Names of every registered architecture, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of ``name``; an error listing the known names if unknown."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
                                   "(add one with pyfastscan.models.register_model)")
    return _REGISTRY[name]


def create(name: str, **kwargs) -> nn.Module:
    """Build the architecture ``name`` with ``kwargs`` (its builder's arguments).

    Raises:
        InvalidArgumentError: unknown name, or arguments the builder does not take (the
            message lists the ones it does).
    """
    entry = get_entry(name)
    try:
        inspect.signature(entry.builder).bind(**kwargs)
    except TypeError as exc:
        params = ", ".join(inspect.signature(entry.builder).parameters)
        raise InvalidArgumentError(f"architecture {name!r} takes ({params}), got {kwargs}: {exc}") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    return entry.builder(**kwargs)
