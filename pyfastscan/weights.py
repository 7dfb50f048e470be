"""Loading trained weights safely: .safetensors, or PyTorch checkpoints with weights_only=True
(nothing in a file can execute code)."""
import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import PyfastscanError

# torchvision's VGG16: features.N is the k-th convolution, classifier.0/3/6 the head.
_TV_FEATURES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
_VGG_CONVS = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
_TV_HEAD = {0: "conv6", 3: "conv7", 6: "conv8"}


class WeightsError(PyfastscanError, ValueError):
    """A weights file cannot be read or does not fit the model; the message lists every problem."""


def _read(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except pickle.UnpicklingError:  # refused by weights_only: PyTorch's advice would be to run it
        raise WeightsError(f"cannot read weights from {path}: it holds code or Python objects, not only tensors; "
                           "pyfastscan does not load such "
                           "files, since loading them could run any code. Save the state dict as .safetensors "
                           "(safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')) from a "
                           "trusted environment") from None
    except Exception as exc:  # corrupt file, truncated zip, ...
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def _translate(state: dict, own: dict) -> dict:
    """Strip DataParallel's "module." prefix and map torchvision VGG16 names to vgg16_fcn's."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith(("features.", "classifier.")) for k in state) or "conv1_1.weight" not in own:
        return state
    names = {f"features.{i}": conv for i, conv in zip(_TV_FEATURES, _VGG_CONVS)}
    names.update({f"classifier.{i}": conv for i, conv in _TV_HEAD.items()})
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        out[f"{names[prefix]}.{leaf}" if prefix in names else key] = value
    return out


def load_weights(model: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load a state dict from ``path`` into ``model`` (in place) and return the model.

    Accepts .safetensors files and PyTorch checkpoints (a state dict, or one wrapped under
    "state_dict" / "model_state_dict" / "model"), read with ``weights_only=True``. For
    ``vgg16_fcn``, torchvision's VGG16 names (``features.N``, ``classifier.0/3/6``) map to
    conv1_1 .. conv5_3 and conv6 .. conv8; a head stored as Linear weights loads into the
    equivalent convolution when the element count matches.

    Args:
        strict: also fail on parameters missing from the file or not in the model. Without
            it, an ImageNet VGG16 file loads the convolutions and leaves conv6 .. conv8.
    Raises:
        WeightsError: listing, by parameter name, every shape mismatch (and, if strict,
            every missing or unexpected name) at once; the model is then left unchanged.
    """
    path = Path(path)
    own = model.state_dict()
    state = _translate(_read(path), own)
    problems, loadable = [], {}
    for key, value in state.items():
        if key not in own:
            if strict:
                problems.append(f"unexpected parameter {key} {tuple(value.shape)}")
            continue
        target = own[key].shape
        if value.shape != target:
            if value.dim() == 2 and len(target) == 4 and value.numel() == own[key].numel():
                value = value.reshape(target)  # a Linear head stored for a conv (Flatten is channel-major)
            else:
                problems.append(f"shape mismatch for {key}: file has {tuple(value.shape)}, model has {tuple(target)}")
                continue
        loadable[key] = value
    if strict:
        problems += [f"missing parameter {k} {tuple(own[k].shape)}" for k in own if k not in state]
    if problems:
        raise WeightsError(f"{path} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    model.load_state_dict(loadable, strict=False)
    return model
