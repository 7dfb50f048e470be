"""load_weights: safe formats, torchvision's VGG16 layout, mismatches reported at once."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from pyfastscan import WeightsError, load_weights, to_dense
from pyfastscan.models import tellez_cnn, vgg16_fcn
from pyfastscan.weights import _TV_FEATURES

WIDTH = 1 / 16


def _torchvision_vgg16_state(width=WIDTH, num_classes=2, head_as_linear=True, seed=0):
    """A state dict in torchvision's VGG16 layout (built by hand: torchvision does not import here),
    with the head trained as conv6..8 (stored as Linear weights when head_as_linear)."""
    reference = vgg16_fcn(num_classes=num_classes, width=width)
    g = torch.Generator().manual_seed(seed)
    convs = [m for m in reference if isinstance(m, torch.nn.Conv2d)]
    state = {}
    for idx, conv in zip(_TV_FEATURES, convs[:13]):
        state[f"features.{idx}.weight"] = torch.randn(conv.weight.shape, generator=g)
        state[f"features.{idx}.bias"] = torch.randn(conv.bias.shape, generator=g)
    for idx, conv in zip((0, 3, 6), convs[13:]):
        w = torch.randn(conv.weight.shape, generator=g)
        state[f"classifier.{idx}.weight"] = w.flatten(1) if head_as_linear else w
        state[f"classifier.{idx}.bias"] = torch.randn(conv.bias.shape, generator=g)
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt_wrapped"])
def test_torchvision_layout_loads_entirely(tmp_path, fmt):
    state = _torchvision_vgg16_state()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if fmt == "pt_wrapped" else state,
                   path)
    model = load_weights(vgg16_fcn(width=WIDTH), path)
    assert torch.equal(model.conv1_1.weight, state["features.0.weight"])
    assert torch.equal(model.conv5_3.bias, state["features.28.bias"])
    assert torch.equal(model.conv6.weight.flatten(1), state["classifier.0.weight"])
    assert torch.equal(model.conv8.bias, state["classifier.6.bias"])
    to_dense(model.eval(), 2)  # the loaded model converts


def test_imagenet_features_without_head_load_non_strict(tmp_path):
    state = {k: v for k, v in _torchvision_vgg16_state().items() if k.startswith("features.")}
    save_file(state, str(tmp_path / "f.safetensors"))
    with pytest.raises(WeightsError, match="missing parameter conv6.weight"):
        load_weights(vgg16_fcn(width=WIDTH), tmp_path / "f.safetensors")
    model = load_weights(vgg16_fcn(width=WIDTH), tmp_path / "f.safetensors", strict=False)
    assert torch.equal(model.conv3_2.weight, state["features.12.weight"])


def test_every_mismatch_reported_at_once_and_model_unchanged(tmp_path):
    model = tellez_cnn(gamma=0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    state["conv10.bias"] = torch.zeros(5)
    state["extra.weight"] = torch.zeros(1)
    del state["conv2.bias"]
    torch.save(state, tmp_path / "bad.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(model, tmp_path / "bad.pt")
    msg = str(info.value)
    for part in ("conv1.weight: file has (3, 3, 3, 3), model has (8, 3, 3, 3)", "conv10.bias",
                 "unexpected parameter extra.weight", "missing parameter conv2.bias"):
        assert part in msg, msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_files_cannot_execute_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(tellez_cnn(), path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tellez_cnn(), tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        load_weights(tellez_cnn(), tmp_path / "junk.safetensors")
