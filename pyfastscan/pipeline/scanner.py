"""Turning any classifier into the scanner the engine runs: dense when it can, patches otherwise.

DESIGN.md 6.2: map cell (i, j) is the classifier's output on the patch whose top-left
corner is (j, i) * step at the scan resolution. Dense mode computes it with the converted
network (``to_dense``); patch mode runs the unchanged network on those patches in batches
(``PatchModel``). Both expose the same interface (geometry, plan, precision, input_dtype,
activation_bytes, ends_with_softmax), so the engine does not care which it runs.
"""
import copy
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..dense import DenseModel, to_dense
from ..errors import InvalidArgumentError
from ..validate import check_optional
from ..models.files import ModelCard, card_of, check_normalize

MODES = ("auto", "dense", "patch")
SAVINGS_CELLS = 64  # map cells per ROI side at which the dense / patch cost ratio is quoted


@dataclass
class Scanner:
    """The module the engine runs, and how it was chosen.

    Attributes:
        model: a DenseModel or a PatchModel.
        mode: "dense" or "patch".
        card: the classifier's ModelCard (from ``load_model``), or None.
        positive_class: output channel the map shows.
        note: one line for the user when patch mode was chosen automatically (why the
            network is not dense-convertible, and what a padding-free one would save).
    """

    model: nn.Module
    mode: str
    card: Optional[ModelCard]
    positive_class: int
    note: Optional[str] = None


def make_scanner(model: nn.Module, *, mode: str = "auto", alpha: int = 1, plan: str = "minimal",
                 precision: str = "fp32", normalize=None, patch: Optional[int] = None, stride: Optional[int] = None,
                 batch_size: Optional[int] = None, positive_class: Optional[int] = None,
                 memory: Optional[int] = None) -> Scanner:
    """Choose and build the scanner for ``model``.

    Args:
        model: a classifier (``load_model``'s, with its card, or any ``nn.Module``), or an
            already built DenseModel / PatchModel (then used as it is).
        mode: "dense" (``to_dense``; errors if the network is not padding-free), "patch"
            (the network on every patch), or "auto" (dense when it converts, else patch).
        alpha: dense factor: the map step is stride / alpha.
        plan, precision: see ``to_dense`` (precision applies to patch mode too).
        normalize: (mean, std) of the input; default the card's.
        patch, stride: the patch grid of patch mode (default: the card's); the step is
            stride / alpha.
        batch_size: patches per batch in patch mode (default: from ``memory``).
        positive_class: default the card's, else 1.
        memory: byte budget for patch mode's batches.
    The caller's model is never modified (a copy is put in eval mode when it is training).
    """
    from ..patch import PatchModel, dense_savings

    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    patch, stride = check_optional("patch", patch), check_optional("stride", stride)
    batch_size = check_optional("batch_size", batch_size)
    positive_class = check_optional("positive_class", positive_class)
    card = card_of(model)
    pos = positive_class if positive_class is not None else (card.positive_class if card else 1)
    if isinstance(model, (DenseModel, PatchModel)):
        kind = "patch" if isinstance(model, PatchModel) else "dense"
        if mode not in ("auto", kind):
            raise InvalidArgumentError(f"mode={mode!r} conflicts with the {type(model).__name__} given")
        return Scanner(model, kind, card, pos)
    if card is not None and card.classes and pos >= len(card.classes):
        raise InvalidArgumentError(f"positive_class {pos} is not one of the {len(card.classes)} classes "
                                   f"{list(card.classes)}")
    normalize = check_normalize(normalize if normalize is not None else (card.normalize if card else None))
    net = copy.deepcopy(model).eval() if model.training else model
    reason = None
    if mode in ("auto", "dense"):
        try:
            dense = to_dense(net, alpha, plan=plan, precision=precision, normalize=normalize)
        except InvalidArgumentError as exc:
            if mode == "dense":
                raise
            reason = str(exc)
        else:
            g = dense.geometry
            if (patch is not None and patch != g.patch) or (stride is not None and stride != g.stride):
                raise InvalidArgumentError(f"patch={patch}, stride={stride} contradict the network's own geometry "
                                           f"(patch {g.patch}, stride {g.stride}) in dense mode; use mode='patch' "
                                           "to scan another grid")
            return Scanner(dense, "dense", card, pos)
    patch = patch if patch is not None else (card.patch if card else None)
    stride = stride if stride is not None else (card.stride if card else None)
    if patch is None or stride is None:
        why = f" ({reason})" if reason else ""
        raise InvalidArgumentError(f"patch mode needs the patch size and the grid stride{why}: pass patch= and "
                                   "stride= (CLI: --patch, --stride), or save the model with them "
                                   "(pyfastscan.save_model)")
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 1 or stride % alpha:
        raise InvalidArgumentError(f"alpha must be a positive integer dividing the stride {stride}, got {alpha!r}")
    step = stride // alpha
    scanner = PatchModel(net, patch, step, precision=precision, batch_size=batch_size, normalize=normalize,
                         memory=memory)
    note = None
    if reason is not None:
        side = patch + (SAVINGS_CELLS - 1) * step
        ratio = dense_savings(scanner.model, patch, step, side)
        note = (f"the model is not dense-convertible ({reason}); scanning in patch mode ({patch} px patches, "
                f"{step} px apart); a padding-free model would need ~{ratio:.0f}x fewer multiply-adds")
    return Scanner(scanner, "patch", card, pos, note)
