"""export_onnx: the ONNX file, run by ONNX Runtime, gives the dense map (DESIGN.md 2.2).

Bound (tests/helpers.py, DESIGN.md 5): ONNX Runtime and the PyTorch DenseModel are two
float32 evaluations of the same sums, each within B = network_error_bound (the rounding
bound of the patch classifier, propagated layer by layer in float64) of the exact
function, so they differ by at most 2B; so does ONNX Runtime from the literal patch loop.
"""
import copy
import logging
import os

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from helpers import _where, network_error_bound, patch_loop, seeded  # noqa: E402
from pyfastscan import InvalidArgumentError, __version__, to_dense  # noqa: E402
from pyfastscan.dense import _flatten  # noqa: E402
from pyfastscan.export import export_onnx  # noqa: E402
from pyfastscan.models import tellez_cnn, vgg16_fcn  # noqa: E402
from pyfastscan.nn import AnchPool2d  # noqa: E402


def _seeded(model, seed=0):
    """tests/helpers.py's recipe, in float32."""
    return seeded(model, seed, torch.float32)


def _dilated_avgpool():
    """tests/test_dense.py VARIED["dilated_avgpool"]: at alpha 4 the minimal plan runs its
    second average pooling with dilation 2 (an AnchPool2d, mode avg, d_a = 1)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Conv2d(4, 4, 3, dilation=2), nn.GELU(), nn.AvgPool2d(2), nn.Conv2d(4, 2, 3))


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"roi": x.numpy()})[0])


def _check_file(path, info, dense, roi_outputs):
    """Names, shapes (dynamic batch) and metadata_props as ONNX Runtime reports them; the
    file's permissions."""
    g = dense.geometry
    side = g.input_side(roi_outputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "roi" and inp.type == "tensor(float)" and inp.shape[1:] == [3, side, side]
    assert out.name == "logits" and out.shape[2:] == [roi_outputs, roi_outputs]
    assert isinstance(inp.shape[0], str) and isinstance(out.shape[0], str)  # dynamic batch
    meta = session.get_modelmeta().custom_metadata_map
    expected = {"patch": g.patch, "stride": g.stride, "alpha": g.alpha, "step": g.step, "input_side": side,
                "output_side": roi_outputs, "plan": dense.plan, "pyfastscan_version": __version__}
    assert {k: meta.get(k) for k in expected} == {k: str(v) for k, v in expected.items()}
    assert info["geometry"] == {k: expected[k] for k in ("patch", "stride", "alpha", "step", "input_side",
                                                         "output_side")}
    assert info["input_shape"] == ("N", 3, side, side) and info["output_shape"][2:] == (roi_outputs, roi_outputs)
    domains = {n.domain for n in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operator domains {domains}"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # readable by other tools, not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def _assert_onnx_matches(model, dense, path, roi_outputs, n=2, seed=1):
    """ONNX Runtime's map within 2B of the float32 DenseModel and of the float32 patch loop."""
    g = dense.geometry
    side = g.input_side(roi_outputs)
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))
    got = _run(path, x)
    with torch.no_grad():
        ref = dense(x)
    loop = patch_loop(model, x, g.patch, g.step)
    crops = [x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch].double()
             for i in range(roi_outputs) for j in range(roi_outputs)]
    bound = network_error_bound(_flatten(model), torch.cat(crops), torch.float32)
    bound = 2 * bound.reshape(len(crops), n, -1).permute(1, 2, 0).reshape(loop.shape)
    for name, other in (("DenseModel", ref), ("patch loop", loop)):
        assert got.shape == other.shape, f"onnx {tuple(got.shape)} != {name} {tuple(other.shape)}"
        bad = (got.double() - other.double()).abs() > bound
        assert not bad.any(), f"onnx vs {name}: " + _where(bad, got.double(), other.double(), bound)


@pytest.mark.parametrize("alpha,roi_outputs", [(1, 2), (2, 4), (4, 5)])
def test_vgg16_fcn_onnx_matches_dense(tmp_path, alpha, roi_outputs):
    model = _seeded(vgg16_fcn(width=1 / 32))
    path = tmp_path / "vgg.onnx"
    info = export_onnx(model, path, roi_outputs=roi_outputs, alpha=alpha)
    dense = to_dense(model, alpha)
    _check_file(path, info, dense, roi_outputs)
    _assert_onnx_matches(model, dense, path, roi_outputs, n=1)


@pytest.mark.parametrize("alpha,plan", [(1, "minimal"), (2, "minimal"), (2, "paper")])
def test_tellez_onnx_matches_dense(tmp_path, alpha, plan):
    # tellez's paper plan at alpha 2 has anchor convolutions with s_a = d_a only: ordinary
    # stride-1 dilated convolutions, so it exports too
    model = _seeded(tellez_cnn(gamma=0.1))
    dense = to_dense(model, alpha, plan=plan)
    info = export_onnx(dense, tmp_path / "tellez.onnx", roi_outputs=5)
    _check_file(tmp_path / "tellez.onnx", info, dense, 5)
    _assert_onnx_matches(model, dense, tmp_path / "tellez.onnx", 5, n=3)


def test_dilated_average_pooling_exports_as_depthwise_convolution(tmp_path):
    model = _seeded(_dilated_avgpool())
    dense = to_dense(model, 4)
    assert any(isinstance(m, AnchPool2d) and m.mode == "avg" and m.dilation > 1 for m in dense.layers)
    info = export_onnx(model, tmp_path / "avg.onnx", roi_outputs=7, alpha=4)
    graph = onnx.load(str(tmp_path / "avg.onnx")).graph
    groups = [a.i for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "group"]
    assert 4 in groups, "the dilated average pooling should be a depthwise (group 4) convolution"
    _check_file(tmp_path / "avg.onnx", info, dense, 7)
    _assert_onnx_matches(model, dense, tmp_path / "avg.onnx", 7)


def test_bf16_dense_model_exports_in_float32(tmp_path, caplog):
    """A bf16 DenseModel is written with its bfloat16-rounded weights, computed in float32:
    the map is the float32 one of the classifier whose weights are those rounded ones."""
    model = _seeded(tellez_cnn(gamma=0.1))
    dense = to_dense(model, 2, precision="bf16")
    with caplog.at_level(logging.WARNING, logger="pyfastscan"):
        info = export_onnx(dense, tmp_path / "bf16.onnx", roi_outputs=4)
    assert "bfloat16" in info["precision"] and "exported in float32" in caplog.text
    assert dense.precision == "bf16" and next(dense.parameters()).dtype == torch.bfloat16  # left as it was
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "bf16.onnx")).metadata_props}
    assert "bfloat16" in meta["precision"]
    rounded = _seeded(tellez_cnn(gamma=0.1))
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    _assert_onnx_matches(rounded, to_dense(rounded, 2), tmp_path / "bf16.onnx", 4)


def test_paper_plan_anchor_layers_are_refused(tmp_path):
    # VGG16-FCN's paper plan at alpha 4: the reconstruction pooling has s_a = 2, d_a = 4 and
    # the later poolings s_a = 8, d_a = 4 (at alpha 2 every anchor layer has s_a = d_a)
    model = _seeded(vgg16_fcn(width=1 / 32))
    for arg in (to_dense(model, 4, plan="paper"), model):
        with pytest.raises(InvalidArgumentError, match='plan="minimal"'):
            export_onnx(arg, tmp_path / "paper.onnx", roi_outputs=4, alpha=None if arg is not model else 4,
                        plan="paper")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    model = _seeded(_dilated_avgpool())
    with pytest.raises(InvalidArgumentError, match="cannot create output folder"):
        export_onnx(model, tmp_path / "file" / "sub" / "m.onnx", roi_outputs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def broken_save(proto, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(_seeded(_dilated_avgpool()), target, roi_outputs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and target.read_bytes() == b"previous"


@pytest.mark.parametrize("kwargs,message", [
    (dict(roi_outputs=0), "roi_outputs must be a positive integer"),
    (dict(roi_outputs=2.0), "roi_outputs must be a positive integer"),
    (dict(roi_outputs=2, alpha=2), "alpha=2 given for a DenseModel converted with alpha 1"),
    (dict(roi_outputs=2, normalize=object()), "already converted"),
])
def test_argument_errors(tmp_path, kwargs, message):
    dense = to_dense(_seeded(_dilated_avgpool()), 1)
    with pytest.raises(InvalidArgumentError, match=message):
        export_onnx(dense, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_self_describing_weights_file(tmp_path, capsys):
    """`pyfastscan export --weights FILE --alpha A --roi-outputs L out.onnx`: the model and its
    normalisation come from the file; ONNX Runtime gives the dense model's map."""
    from pyfastscan import load_model, save_model
    from pyfastscan.cli import main
    from pyfastscan.models import demo_cnn

    net = _seeded(demo_cnn())
    weights = tmp_path / "w" / "demo.safetensors"
    weights.parent.mkdir()
    norm = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    save_model(net, weights, arch="demo_cnn", classes=["a", "b"], positive_class=1, mpp=1.0, normalize=norm)
    out = tmp_path / "onnx" / "demo.onnx"
    out.parent.mkdir()
    assert main(["export", "--weights", str(weights), "--alpha", "2", "--roi-outputs", "4", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    dense = to_dense(load_model(weights), 2, normalize=norm)
    _check_file(out, export_info(dense, 4), dense, 4)
    x = torch.rand(1, 3, dense.geometry.input_side(4), dense.geometry.input_side(4),
                   generator=torch.Generator().manual_seed(3))
    got = _run(out, x)
    with torch.no_grad():
        ref = dense(x)
    assert got.shape == ref.shape
    # both run the same float32 network, the normalisation folded into the first convolution
    # (w / std, b - sum w * mean / std): each is within that network's float32 bound on the
    # raw input, so they differ by at most twice it
    mean, std = (torch.tensor(v) for v in norm)
    folded = copy.deepcopy(net)
    with torch.no_grad():
        first = folded[0]
        first.bias -= (first.weight * (mean / std).reshape(1, 3, 1, 1)).sum((1, 2, 3))
        first.weight /= std.reshape(1, 3, 1, 1)
    g = dense.geometry
    crops = torch.cat([x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch].double()
                       for i in range(4) for j in range(4)])
    bound = network_error_bound(_flatten(folded), crops, torch.float32)
    bound = 2 * bound.reshape(16, 1, -1).permute(1, 2, 0).reshape(ref.shape)
    bad = (got.double() - ref.double()).abs() > bound
    assert not bad.any(), _where(bad, got.double(), ref.double(), bound)
    assert main(["export", "--weights", str(tmp_path / "missing.safetensors"), "--roi-outputs", "4",
                 str(out)]) == 2


def export_info(dense, roi_outputs):
    g = dense.geometry
    side = g.input_side(roi_outputs)
    return {"geometry": dict(patch=g.patch, stride=g.stride, alpha=g.alpha, step=g.step, input_side=side,
                             output_side=roi_outputs), "input_shape": ("N", 3, side, side),
            "output_shape": ("N", 2, roi_outputs, roi_outputs)}


def test_padding_free_residual_graph_exports(tmp_path):
    """A traced graph (residual_fcn: cropped skips, BN) exports with its submodules replaced by
    standard ones; ONNX Runtime within twice the graph's float32 bound of the patch loop."""
    from pyfastscan.models import residual_fcn
    from test_dense_graph import _ErrorBound

    torch.manual_seed(0)
    model = residual_fcn(width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    dense = to_dense(model, 4)
    assert not isinstance(dense.layers, nn.Sequential)  # the graph path
    path = tmp_path / "rfcn.onnx"
    info = export_onnx(dense, path, roi_outputs=3)
    _check_file(path, info, dense, 3)
    g = dense.geometry
    x = torch.rand(1, 3, g.input_side(3), g.input_side(3), generator=torch.Generator().manual_seed(2))
    got = _run(path, x)
    loop = patch_loop(model, x, g.patch, g.step)
    crops = torch.cat([x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch].double()
                       for i in range(3) for j in range(3)])
    with torch.no_grad():
        bound = _ErrorBound(copy.deepcopy(model).double(), torch.float32).run(crops).e
    bound = 2 * bound.reshape(9, 1, -1).permute(1, 2, 0).reshape(loop.shape)
    bad = (got.double() - loop.double()).abs() > bound
    assert not bad.any(), _where(bad, got.double(), loop.double(), bound)
