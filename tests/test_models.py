"""Self-describing weights (DESIGN.md 6.3), the model registry, and the CLI that needs only --weights."""
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import pyfastscan
from pyfastscan import WeightsError, load_model, save_model
from pyfastscan.errors import InvalidArgumentError
from pyfastscan.models import (ModelCard, create, get_entry, list_models, read_card, register_model, registry,
                               tellez_cnn)
from pyfastscan.samples import skin_slide_path

DESIGN_KEYS = {"pyfastscan.arch", "pyfastscan.arch_kwargs", "pyfastscan.classes", "pyfastscan.positive_class",
               "pyfastscan.mpp", "pyfastscan.normalize", "pyfastscan.patch", "pyfastscan.stride",
               "pyfastscan.version"}


def _seeded(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model.eval()


def test_subpackages_reachable_after_import():
    assert pyfastscan.models.create is create
    assert callable(pyfastscan.io.read_geojson)
    assert callable(pyfastscan.eval.froc_score) and callable(pyfastscan.eval.roc_auc)


def test_registry_lists_builtins_and_creates_them():
    names = list_models()
    assert {"vgg16_fcn", "tellez_cnn", "residual_fcn", "demo_cnn"} <= set(names)
    net = create("tellez_cnn", gamma=0.25, num_classes=3)
    assert net[-1].out_channels == 3 and net.conv1.out_channels == round(32 * 0.25)
    with pytest.raises(InvalidArgumentError, match="unknown architecture 'nope'.*vgg16_fcn"):
        create("nope")
    with pytest.raises(InvalidArgumentError, match="takes \\(num_classes, gamma\\)"):
        create("tellez_cnn", widht=2)


def test_register_model_and_name_clash():
    def tiny_net(num_classes: int = 2):
        """A tiny padding-free net. More text."""
        return nn.Sequential(nn.Conv2d(3, num_classes, 3))

    try:
        register_model(tiny_net)
        assert get_entry("tiny_net").description == "A tiny padding-free net"
        assert isinstance(create("tiny_net", num_classes=4), nn.Sequential)
        with pytest.raises(InvalidArgumentError, match="already registered"):
            register_model(lambda: None, name="tiny_net")
        register_model(patch=64, stride=32, dense=False, name="tiny_net", overwrite=True)(tiny_net)
        assert get_entry("tiny_net").patch == 64
        with pytest.raises(InvalidArgumentError, match="patch must be a positive int"):
            register_model(tiny_net, name="bad", patch=0)
    finally:
        registry._REGISTRY.pop("tiny_net", None)


def test_entry_point_plugin_is_registered(tmp_path, monkeypatch):
    """A third-party package's ``pyfastscan.models`` entry point: found, loaded, registered."""
    pkg = tmp_path / "thirdparty_nets.py"
    pkg.write_text("from torch import nn\n\ndef plugin_net(num_classes=2):\n"
                   "    '''A plug-in network.'''\n    return nn.Sequential(nn.Conv2d(3, num_classes, 5))\n")
    dist = tmp_path / "thirdparty_nets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-nets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pyfastscan.models]\nplugin_net = thirdparty_nets:plugin_net\n"
                                           "broken_net = thirdparty_nets:does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        with pytest.warns(UserWarning, match="cannot load model entry point 'broken_net'"):
            names = list_models()
        assert "plugin_net" in names and "broken_net" not in names
        assert create("plugin_net", num_classes=3)[0].out_channels == 3
        assert pyfastscan.geometry(create("plugin_net")).patch == 5
    finally:
        registry._REGISTRY.pop("plugin_net", None)
        sys.modules.pop("thirdparty_nets", None)


def test_save_load_round_trip_holds_every_design_key(tmp_path):
    net = _seeded(tellez_cnn(gamma=0.125))
    path = tmp_path / "mitosis.safetensors"
    card = save_model(net, path, arch="tellez_cnn", arch_kwargs={"gamma": 0.125}, classes=["other", "mitosis"],
                      positive_class="mitosis", mpp=0.25, normalize=([0.5, 0.5, 0.5], [0.25, 0.2, 0.3]))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert DESIGN_KEYS <= set(meta)
    assert meta["pyfastscan.arch"] == "tellez_cnn" and json.loads(meta["pyfastscan.arch_kwargs"]) == {"gamma": 0.125}
    assert json.loads(meta["pyfastscan.normalize"]) == {"mean": [0.5] * 3, "std": [0.25, 0.2, 0.3]}
    assert (card.patch, card.stride, card.positive_class) == (97, 4, 1)
    assert meta["pyfastscan.version"] == pyfastscan.__version__
    loaded = load_model(path)
    assert loaded.pyfastscan_card == card == read_card(path)
    assert not loaded.training
    x = torch.rand(1, 3, 97, 97)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_save_model_checks_what_it_writes(tmp_path):
    net = tellez_cnn(gamma=0.125)
    kw = dict(classes=["a", "b"], positive_class=1, mpp=0.25)
    with pytest.raises(InvalidArgumentError, match="not a tellez_cnn\\(\\).*conv1.weight"):
        save_model(net, tmp_path / "w.safetensors", arch="tellez_cnn", **kw)  # gamma 0.6 by default
    with pytest.raises(InvalidArgumentError, match="positive_class 'c' is not one of"):
        save_model(net, tmp_path / "w.safetensors", arch="tellez_cnn", arch_kwargs={"gamma": 0.125},
                   **dict(kw, positive_class="c"))
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(InvalidArgumentError, match="mpp must be a positive number"):
            save_model(net, tmp_path / "w.safetensors", arch="tellez_cnn", arch_kwargs={"gamma": 0.125},
                       **dict(kw, mpp=bad))
    with pytest.raises(InvalidArgumentError, match="std positive"):
        save_model(net, tmp_path / "w.safetensors", arch="tellez_cnn", arch_kwargs={"gamma": 0.125},
                   normalize=([0, 0, 0], [1, 0, 1]), **kw)
    assert not os.path.exists(tmp_path / "w.safetensors")


def test_load_model_errors_and_overrides(tmp_path):
    net = tellez_cnn(gamma=0.125)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    with pytest.raises(WeightsError, match="does not say which architecture.*--arch"):
        load_model(bare)
    m = load_model(bare, arch="tellez_cnn", arch_kwargs={"gamma": 0.125})
    assert m.pyfastscan_card.arch == "tellez_cnn" and m.pyfastscan_card.mpp is None
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_model(bare, arch="tellez_cnn")  # gamma 0.6: every shape differs
    described = tmp_path / "d.safetensors"
    save_model(net, described, arch="tellez_cnn", arch_kwargs={"gamma": 0.125}, classes=["a", "b"],
               positive_class=1, mpp=0.25)
    with pytest.warns(UserWarning, match="arch 'vgg16_fcn' overrides the file's 'tellez_cnn'"), \
            pytest.raises(WeightsError):
        load_model(described, arch="vgg16_fcn")
    meta = {"pyfastscan.arch": "tellez_cnn", "pyfastscan.mpp": "-1"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "m.safetensors"), meta)
    with pytest.raises(WeightsError, match="pyfastscan.mpp='-1' is invalid"):
        load_model(tmp_path / "m.safetensors")
    meta = {"pyfastscan.arch": "tellez_cnn", "pyfastscan.classes": '["a", "b"]', "pyfastscan.positive_class": "2"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "p.safetensors"), meta)
    with pytest.raises(WeightsError, match="positive_class=2 is not an index"):
        load_model(tmp_path / "p.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_card_metadata_round_trip():
    card = ModelCard("vgg16_fcn", {"width": 0.5}, ("n", "t"), 1, 0.243, ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0)), 244, 32,
                     "0.1.0", {"note": "x"})
    assert ModelCard.from_metadata(card.to_metadata()) == card
    assert all(isinstance(v, str) for v in card.to_metadata().values())


def test_bundled_demo_model_describes_itself():
    from pyfastscan.demo_train import WEIGHTS

    card = read_card(WEIGHTS)
    assert (card.arch, card.classes[card.positive_class], card.mpp, card.patch, card.stride) == \
        ("demo_cnn", "carcinoma", 1.0, 38, 8)


def test_cli_scan_needs_only_the_weights(tmp_path, capsys):
    """`pyfastscan scan SLIDE --weights demo.safetensors`: architecture, class and resolution
    come from the file; --scan-mpp overrides the resolution, with a warning."""
    pytest.importorskip("openslide")
    from pyfastscan.cli import main
    from pyfastscan.demo_train import WEIGHTS

    out = tmp_path / "out"
    assert main(["scan", skin_slide_path(), "--weights", WEIGHTS, "--out", str(out), "--quiet"]) == 0
    report = json.load(open(out / "report.json"))
    assert report["scan_mpp"] == pytest.approx(1.0)
    assert report["model_geometry"]["patch"] == 38 and report["model_geometry"]["mode"] == "dense"
    capsys.readouterr()
    assert main(["scan", skin_slide_path(), "--weights", WEIGHTS, "--out", str(tmp_path / "o2"), "--quiet",
                 "--scan-mpp", "4.0"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "scanning at 4 um/px, but the model was trained at 1 um/px" in err
    assert json.load(open(tmp_path / "o2" / "report.json"))["scan_mpp"] == pytest.approx(4.0)


def test_cli_models_lists_geometry(capsys):
    from pyfastscan.cli import main

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["vgg16_fcn"]["patch"], rows["vgg16_fcn"]["stride"], rows["vgg16_fcn"]["mode"]) == (244, 32, "dense")
    assert rows["tellez_cnn"]["parameters"] == sum(p.numel() for p in tellez_cnn().parameters())
    assert main(["models"]) == 0
    assert "demo_cnn" in capsys.readouterr().out


def test_scan_leaves_the_callers_model_as_it_was():
    from helpers import ArraySlide
    from test_scan import _image

    net = _seeded(tellez_cnn(gamma=0.125)).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    img = np.tile(_image(), (2, 2, 1))
    pyfastscan.scan_slide(ArraySlide(img), net, alpha=1, progress=False, roi_outputs=8)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyfastscan.scan_slide(ArraySlide(img), net.eval(), alpha=1, progress=False, roi_outputs=8)


def test_cards_fill_the_registered_grid_and_refuse_clashing_metadata(tmp_path):
    from pyfastscan.models import resnet18

    net = resnet18(num_classes=2, width=4)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    card = load_model(bare, arch="resnet18", arch_kwargs={"width": 4}).pyfastscan_card
    assert (card.patch, card.stride, card.mpp) == (224, 32, None)  # the registered grid, no guessed resolution
    kw = dict(arch="resnet18", arch_kwargs={"width": 4}, classes=["a", "b"], positive_class=1, mpp=0.5)
    assert save_model(net, tmp_path / "p.safetensors", patch=96, **kw).stride == 32  # each default on its own
    with pytest.raises(InvalidArgumentError, match="may not start with 'pyfastscan.'"):
        save_model(net, tmp_path / "x.safetensors", extra={"pyfastscan.note": "x"}, **kw)
    card = save_model(tellez_cnn(gamma=0.125), tmp_path / "t.safetensors", arch="tellez_cnn",
                      arch_kwargs={"gamma": 0.125}, classes=("a", "b"), positive_class=1, mpp=0.25,
                      extra={"note": "kept"})
    assert read_card(tmp_path / "t.safetensors") == card


def test_positive_class_beyond_the_outputs_is_a_clear_error():
    from helpers import ArraySlide
    from test_scan import _image, _model

    with pytest.raises(InvalidArgumentError, match="positive_class is 5, but the model has 2 output"):
        pyfastscan.scan_slide(ArraySlide(_image()), _model(), alpha=1, positive_class=5, progress=False)
    net = tellez_cnn(gamma=0.125)
    net.pyfastscan_card = ModelCard("tellez_cnn", {"gamma": 0.125}, ("a", "b"), 1)
    with pytest.raises(InvalidArgumentError, match="positive_class 2 is not one of the 2 classes"):
        pyfastscan.scan_slide(ArraySlide(_image()), net, alpha=1, positive_class=2, progress=False)
