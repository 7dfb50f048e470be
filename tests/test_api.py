"""The public API as a new user meets it (issue 17, item 4): what `import pyfastscan`
reaches, consistent return types and argument orders, no silent unit defaults, and a
caller's model left as it was."""
import inspect

import numpy as np
import pytest
import torch

import pyfastscan
from helpers import ArraySlide
from pyfastscan import InvalidArgumentError, scan_slide, to_dense
from pyfastscan.io import Annotation, read_asap_xml, read_geojson, write_asap_xml, write_geojson
from pyfastscan.models.nets import tellez_cnn, vgg16_fcn
from test_scan import _image, _model


def test_subpackages_are_attributes_of_the_package():
    for name in ("models", "io", "eval", "slide", "ops", "nn", "mitosis"):
        assert inspect.ismodule(getattr(pyfastscan, name)), name
        assert name in pyfastscan.__all__ or name == "slide"


def test_annotation_readers_return_the_same_type(tmp_path):
    anns = [Annotation("polygon", [[0, 0], [10, 0], [10, 10]], "Tumor", "t")]
    xml, geo = read_asap_xml(write_asap_xml(tmp_path / "a.xml", anns)), read_geojson(write_geojson(tmp_path / "a.json",
                                                                                                   anns))
    assert type(xml) is type(geo) is list
    assert all(isinstance(a, Annotation) for a in xml + geo)
    assert np.array_equal(xml[0].coords, geo[0].coords)


def test_architectures_take_num_classes_first_and_the_rest_by_keyword():
    for fn, other in ((vgg16_fcn, "width"), (tellez_cnn, "gamma")):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].name == "num_classes"
        assert inspect.signature(fn).parameters[other].kind is inspect.Parameter.KEYWORD_ONLY
    assert tellez_cnn(3, gamma=0.125)[-1].out_channels == 3
    with pytest.raises(InvalidArgumentError, match="num_classes must be an integer"):
        tellez_cnn(0.25)  # the old order (gamma first) is refused, not read as num_classes=0.25


def test_candidates_needs_the_resolution():
    img = np.full((32, 32, 3), 230, np.uint8)
    with pytest.raises(TypeError, match="mpp"):
        pyfastscan.mitosis.candidates(img)
    assert pyfastscan.mitosis.candidates(img, mpp=0.5).shape == (0, 2)


def test_dense_model_holds_each_tensor_once_and_keeps_nn_module_compile():
    dense = to_dense(tellez_cnn(gamma=0.125).eval(), 1)
    keys = list(dense.state_dict())
    assert len(keys) == len(list(dense.parameters())) + len(list(dense.buffers()))
    assert all(k.startswith("layers.") for k in keys)
    assert type(dense).compile is torch.nn.Module.compile  # not shadowed
    assert dense.compile_layers is not None and "compile_layers" in type(dense).__dict__


def test_scan_leaves_the_callers_model_as_it_was():
    model = _model(torch.float32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    scan_slide(ArraySlide(_image()), model, alpha=1, progress=False, roi_outputs=8)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_dense_model_is_used_as_built_and_conflicting_arguments_are_refused():
    img = ArraySlide(_image())
    dense = to_dense(_model(torch.float32), 2)
    res = scan_slide(img, dense, progress=False, roi_outputs=8)  # alpha None: the DenseModel's own
    assert res.geometry["alpha"] == 2
    assert res.geometry["precision"] == "fp32"
    assert np.array_equal(res.heatmap, scan_slide(img, dense, alpha=2, plan="minimal", precision="fp32",
                                                  progress=False, roi_outputs=8).heatmap)
    for kw, what in ((dict(alpha=1), "alpha=1"), (dict(plan="paper"), "plan='paper'"),
                     (dict(precision="bf16"), "precision='bf16'")):
        with pytest.raises(InvalidArgumentError, match=f"DenseModel, already built: {what}"):
            scan_slide(img, dense, progress=False, roi_outputs=8, **kw)
