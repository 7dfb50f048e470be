"""to_dense: the dense map equals a literal patch-by-patch loop (DESIGN.md 2.2, 2.3)."""
import pytest
import torch
from torch import nn

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import seeded as _seeded, assert_dense_equals_patch_loop, assert_low_precision, patch_loop
from pyfastscan import InvalidArgumentError, geometry, to_dense
from pyfastscan.models import tellez_cnn, vgg16_fcn
from pyfastscan.ops import last_backend


def _brute_geometry(model, max_side=400):
    """Smallest input with a 1x1 output (the patch), and the input growth per extra output."""
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        side = 1
        while side <= max_side:
            try:
                out = model(torch.zeros(1, 3, side, side, dtype=dtype))
                if out.dim() == 2 or out.shape[-1] == 1:  # a Linear head gives (N, K)
                    break
            except RuntimeError:  # input too small for some layer
                pass
            side += 1
        grow = side + 1
        try:
            while True:
                out = model(torch.zeros(1, 3, grow, grow, dtype=dtype))
                if not (out.dim() == 2 or out.shape[-1] == 1):
                    break
                grow += 1
        except RuntimeError:  # a Linear head runs on S_p sizes only: past them, no stride to measure
            return side, None if grow == side + 1 else grow - side
    return side, grow - side


def _input(geo, map_side, dtype, n=1, seed=1):
    side = geo.input_side(map_side)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g, dtype=torch.float64).to(dtype)


VARIED = {
    "k5_stride3pool": lambda: nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.MaxPool2d(3, 3), nn.Conv2d(4, 5, 3),
                                            nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(5, 3, 2)),
    "dilated_avgpool": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Tanh(), nn.AvgPool2d(2),
                                             nn.Conv2d(4, 4, 3, dilation=2), nn.GELU(), nn.AvgPool2d(2),
                                             nn.Conv2d(4, 2, 3)),
    "bn_linear_head": lambda: nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.SiLU(), nn.MaxPool2d(2)),
        nn.Dropout(0.3), nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.LeakyReLU(0.1), nn.Identity(),
        nn.Linear(8, 3), nn.Softmax(dim=1)),
    "strided_conv": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Sigmoid(), nn.Conv2d(4, 4, 3, stride=3),
                                          nn.ReLU(), nn.Conv2d(4, 2, 2)),
}


def test_vgg16_fcn_geometry_is_table_one():
    g = geometry(vgg16_fcn())
    assert (g.patch, g.stride) == (244, 32)
    narrow = _seeded(vgg16_fcn(width=1 / 32))
    assert _brute_geometry(narrow) == (244, 32)


def test_tellez_geometry():
    model = tellez_cnn()
    g = geometry(model)
    assert (g.patch, g.stride) == (97, 4)
    assert _brute_geometry(_seeded(tellez_cnn(gamma=0.1))) == (97, 4)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [19, 19, 38, 38, 77, 77, 154, 154, 307, 2]  # Table II times gamma = 0.6


@pytest.mark.parametrize("name", list(VARIED))
def test_geometry_matches_brute_force(name):
    model = _seeded(VARIED[name]())
    g = geometry(model)
    patch, stride = _brute_geometry(model)
    assert g.patch == patch and (stride is None or g.stride == stride)


@pytest.mark.parametrize("plan", ["minimal", "paper"])
@pytest.mark.parametrize("alpha,map_side", [(1, 3), (2, 4), (4, 8), (4, 5), (8, 8), (8, 11)])
def test_vgg16_fcn_dense_equals_patch_loop(alpha, map_side, plan):
    # map sides that are not a multiple of alpha exercise the paper plan's whole-group padding
    model = _seeded(vgg16_fcn(width=1 / 32))
    dense = to_dense(model, alpha, plan=plan)
    assert dense.geometry.step == 32 // alpha
    assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, map_side, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("alpha", [1, 2, 4])
def test_tellez_dense_equals_patch_loop(alpha, dtype):
    model = _seeded(tellez_cnn(gamma=0.1), dtype=dtype)
    dense = to_dense(model, alpha)
    assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, 2 * alpha + 1, dtype, n=2))


@pytest.mark.parametrize("name,alphas", [("k5_stride3pool", [1, 2, 3, 6]), ("dilated_avgpool", [1, 2, 4]),
                                         ("bn_linear_head", [1, 2, 4]), ("strided_conv", [1, 2, 3, 6])])
@pytest.mark.parametrize("plan", ["minimal", "paper"])
def test_varied_networks_dense_equals_patch_loop(name, alphas, plan):
    model = _seeded(VARIED[name]())
    for alpha in alphas:
        try:
            dense = to_dense(model, alpha, plan=plan)
        except InvalidArgumentError as exc:
            assert plan == "paper" and "reconstruction layer" in str(exc)
            continue
        assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, 2 * alpha + 1, torch.float64))


@pytest.mark.parametrize("plan", ["minimal", "paper"])
def test_float32_vgg(plan):
    model = _seeded(vgg16_fcn(width=1 / 32), dtype=torch.float32)
    dense = to_dense(model, 4, plan=plan)
    assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, 6, torch.float32))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("plan", ["minimal", "paper"])
def test_each_float32_layout_equals_the_patch_loop(plan, layout):
    model = _seeded(vgg16_fcn(width=1 / 32), dtype=torch.float32)
    dense = to_dense(model, 4, plan=plan, layout=layout)
    assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, 6, torch.float32))
    assert (dense.layout_used, dense.layout_reason) == (layout, "requested")


def test_layout_auto_is_a_rule_of_the_layers_and_the_forward_runs_in_it():
    """channels_last unless kernels of 7 x 7 or more do most of the work (Tellez's 14 x 14
    convolution) or anchor layers run; decided from the layers, so every run, process and
    Ray worker computes the same map; one forward is one run of the layers."""
    import pickle

    vgg = to_dense(_seeded(vgg16_fcn(width=1 / 32), dtype=torch.float32), 2)
    tellez = to_dense(_seeded(tellez_cnn(gamma=0.1), dtype=torch.float32), 2)
    paper = to_dense(_seeded(vgg16_fcn(width=1 / 32), dtype=torch.float32), 4, plan="paper")
    assert vgg.auto_layout()[0] == "channels_last"
    assert tellez.auto_layout()[0] == "nchw" and "of the multiply-adds" in tellez.auto_layout()[1]
    has_anchors = any(type(m).__name__.startswith("Anch") for m in paper.layers.modules())
    assert paper.auto_layout()[0] == ("nchw" if has_anchors else "channels_last")
    for dense in (vgg, tellez):
        want = dense.auto_layout()[0]
        assert dense.layout == "auto" and dense.layout_used is None
        seen = []
        hook = dense.layers[0].register_forward_hook(lambda m, i, o: seen.append(
            i[0].is_contiguous(memory_format=torch.channels_last) and not i[0].is_contiguous()))
        x = _input(dense.geometry, 3, torch.float32)
        y = dense(x)
        assert seen == [want == "channels_last"] and dense.layout_used == want and dense.layout_reason
        hook.remove()
        assert pickle.loads(pickle.dumps(dense)).layout_used == want  # a worker runs what the driver ran
        assert torch.equal(pickle.loads(pickle.dumps(dense))(x), y)
    with pytest.raises(InvalidArgumentError, match="layout"):
        to_dense(_seeded(vgg16_fcn(width=1 / 32)), 2, layout="nhwc")
    with pytest.raises(InvalidArgumentError, match="layout"):
        vgg.layout = "NCHW"


def _bf16_patch_loop(model, x, geo):
    """PyTorch's own bfloat16 path: the patch loop under bf16 autocast, channels_last."""
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return patch_loop(model, x.contiguous(memory_format=torch.channels_last), geo.patch, geo.step).float()


@pytest.mark.parametrize("name,alpha,plan,map_side", [("vgg16_fcn", 2, "minimal", 4), ("vgg16_fcn", 4, "paper", 6),
                                                      ("tellez", 2, "minimal", 9)])
def test_bf16_within_twice_pytorch_bf16_error(name, alpha, plan, map_side):
    """DESIGN.md 5 low-precision rule, against the float32 patch loop."""
    model = _seeded(vgg16_fcn(width=1 / 8) if name == "vgg16_fcn" else tellez_cnn(gamma=0.25), dtype=torch.float32)
    dense = to_dense(model, alpha, plan=plan, precision="bf16")
    x = _input(dense.geometry, map_side, torch.float32)
    with torch.no_grad():
        out = dense(x)
    assert out.dtype == torch.float32 and next(dense.parameters()).dtype == torch.bfloat16
    ref = patch_loop(model, x, dense.geometry.patch, dense.geometry.step)
    assert_low_precision(out, _bf16_patch_loop(model, x, dense.geometry), ref)


def test_compiled_dense_equals_patch_loop():
    model = _seeded(VARIED["strided_conv"](), dtype=torch.float32)
    dense = to_dense(model, 2, compile=True)
    assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, 5, torch.float32))


def test_dense_model_is_frozen_and_runs_the_native_path_under_grad_mode():
    dense = to_dense(_seeded(VARIED["bn_linear_head"]()), 4, plan="paper")  # AnchPool s_a=2, d_a=4, AnchConv
    assert not any(p.requires_grad for p in dense.parameters()) and not dense.training
    dense(_input(dense.geometry, 4, torch.float64))  # grad mode on: frozen weights keep the C++ path
    assert last_backend("anch_conv2d") == "cpu" and last_backend("anch_pool2d") == "cpu"


_ACTS = [nn.ReLU, nn.ELU, nn.Tanh, nn.SiLU]


@st.composite
def _architectures(draw):
    """Random padding-free nets: 2-4 blocks of conv (+ activation) and optional pooling."""
    layers, c = [], 3
    for _ in range(draw(st.integers(2, 4))):
        o = draw(st.integers(1, 3))
        layers.append(nn.Conv2d(c, o, draw(st.integers(1, 4)), stride=draw(st.integers(1, 2)),
                                dilation=draw(st.integers(1, 2))))
        layers.append(draw(st.sampled_from(_ACTS))())
        c = o
        pool = draw(st.sampled_from(["none", "max", "avg"]))
        if pool != "none":
            k, s = draw(st.integers(2, 3)), draw(st.integers(1, 3))
            layers.append(nn.MaxPool2d(k, s, dilation=draw(st.integers(1, 2))) if pool == "max"
                          else nn.AvgPool2d(k, s))
    layers.append(nn.Conv2d(c, 2, 1))
    return nn.Sequential(*layers)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=_architectures(), pick=st.integers(0, 100), plan=st.sampled_from(["minimal", "paper"]),
       extra=st.integers(0, 3))
def test_generated_architectures_dense_equals_patch_loop(arch, pick, plan, extra):
    """Every alpha dividing the stride, on map sides up to 8 + 3. The check holds every
    patch of the map at once (the rounding bound propagates through all crops), so cases
    whose map_side^2 * patch^2 exceeds 4 million pixels are skipped: four blocks of strided
    layers reach patches of 3,600 px and alphas of 1,296, which once took 24 GB."""
    model = _seeded(arch)
    geo = geometry(model)
    divisors = [a for a in range(1, geo.stride + 1) if geo.stride % a == 0]
    alpha = divisors[pick % len(divisors)]
    map_side = min(alpha, 8) + extra
    assume(map_side * map_side * geo.patch * geo.patch <= 4_000_000)
    try:
        dense = to_dense(model, alpha, plan=plan)
    except InvalidArgumentError as exc:  # the paper schedule is undefined for some stride sequences
        assert plan == "paper" and "reconstruction layer" in str(exc)
        return
    assert_dense_equals_patch_loop(model, dense, _input(dense.geometry, map_side, torch.float64))


def test_geometry_round_trip():
    g = to_dense(_seeded(vgg16_fcn(width=1 / 32)), 2).geometry
    # Eq. 1: L_r' = L_p + (L_m - 1) S_p + (alpha - 1) S_p / alpha gives alpha * L_m outputs
    for lm in range(1, 6):
        side = g.patch + (lm - 1) * g.stride + (g.alpha - 1) * g.step
        assert g.input_side(2 * lm) == side and g.output_side(side) == 2 * lm
    assert g.output_side(g.patch - 1) == 0


def test_original_model_not_modified():
    model = _seeded(VARIED["bn_linear_head"]())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_dense(model, 4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[0][0].stride == (1, 1)


@pytest.mark.parametrize("model,alpha,message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), 1, "padding"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)), 1, r"position 1 \(Upsample\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.MaxPool2d(2, ceil_mode=True)), 1, "ceil_mode"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).train()), 1, "training mode"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 2, 2)), 3, "alpha must be a positive integer"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 2, 2)), 0, "alpha"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 9 + 1, 2)), 1, "square feature map"),
    (nn.Sequential(nn.Conv2d(3, 4, (3, 2))), 1, "non-square"),
])
def test_conversion_errors(model, alpha, message):
    with pytest.raises(InvalidArgumentError, match=message):
        to_dense(model, alpha)


def test_bad_plan_and_precision():
    model = VARIED["strided_conv"]()
    with pytest.raises(InvalidArgumentError, match="plan must be"):
        to_dense(model, 2, plan="fast")
    with pytest.raises(InvalidArgumentError, match="precision must be"):
        to_dense(model, 2, precision="fp16")


def test_input_smaller_than_patch():
    dense = to_dense(_seeded(VARIED["strided_conv"]()), 2)
    with pytest.raises(InvalidArgumentError, match="patch size"):
        dense(torch.zeros(1, 3, dense.geometry.patch - 1, 50, dtype=torch.float64))


@pytest.mark.parametrize("plan,alpha,map_side", [("minimal", 4, 5), ("paper", 4, 5), ("paper", 2, 3)])
def test_multiply_adds_match_the_layers_that_run(plan, alpha, map_side):
    """The cost model the benchmark prints equals the convolutions' actual output shapes."""
    from pyfastscan.nn import AnchConv2d

    dense = to_dense(_seeded(vgg16_fcn(width=1 / 32)), alpha, plan=plan)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2] * o.shape[-1] * m.weight.numel()))
             for m in dense.layers if isinstance(m, (nn.Conv2d, AnchConv2d))]
    side = dense.geometry.input_side(map_side) + 3
    dense(torch.zeros(1, 3, side, side, dtype=torch.float64))
    for h in hooks:
        h.remove()
    assert len(seen) == 16 and dense.multiply_adds(side) == sum(seen)


@pytest.mark.parametrize("plan,alpha,precision", [("minimal", 2, "fp32"), ("paper", 4, "fp32"), ("minimal", 2, "bf16")])
def test_activation_bytes_match_the_tensors_that_run(plan, alpha, precision):
    """The memory model that chooses the ROI size equals the largest input + output pair
    of the layers' actual tensors."""
    dense = to_dense(_seeded(vgg16_fcn(width=1 / 32), dtype=torch.float32), alpha, plan=plan, precision=precision)
    pairs = []
    hooks = [m.register_forward_hook(lambda m, i, o: pairs.append(i[0].numel() * i[0].element_size()
                                                                  + o.numel() * o.element_size()))
             for m in dense.layers]
    side = dense.geometry.input_side(5) + 3
    dense(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    assert len(pairs) == len(dense.layers) and dense.activation_bytes(side) == max(pairs)
