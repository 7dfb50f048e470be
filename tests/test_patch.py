"""Patch mode (PatchModel) equals the literal patch loop; ResNets load torchvision weights.

Batched and one-by-one runs of the same float64 network are not bitwise equal on this
CPU (oneDNN / BLAS pick other blockings for other batch sizes and for channels_last;
differences ~1e-16), so both are compared within twice a first-order rounding bound
(:func:`_first_order_bound`: each layer's own rounding, gamma_n of tests/helpers.py, carried
to the logits by the network's gradient; ~1e-12 here, against observed differences of ~1e-15).
The worst-case propagation of helpers.network_error_bound (|W| at every layer) is valid
too but grows with depth to ~0.05 for ResNet-18, too loose to test anything.
"""
import copy
import doctest
import math
from itertools import product

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import _where, assert_low_precision, gamma
from pyfastscan import InvalidArgumentError, geometry, to_dense
from pyfastscan import patch as patch_module
from pyfastscan.models import resnet as resnet_module
from pyfastscan.models.resnet import BasicBlock, Bottleneck, resnet18, resnet50
from pyfastscan.patch import PatchModel, _blocks, dense_savings

PATCH = 32
NORM = ((0.7, 0.6, 0.5), (0.2, 0.25, 0.3))
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 networks: one thread is 10-40x faster than two on this shared 2-core
    machine (OpenMP barriers per small layer); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seeded_resnet(width=4, num_classes=3, dtype=F64, seed=0):
    torch.manual_seed(seed)
    m = resnet18(num_classes, width=width)
    for mod in m.modules():  # BatchNorm statistics away from the identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.1, 0.1)
    return m.to(dtype).eval()


def _roi(n=2, h=45, w=52, dtype=F64, seed=1):
    return torch.rand(n, 3, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _normalized(x, normalize):
    if normalize is None:
        return x
    mean, std = (torch.tensor(v, dtype=x.dtype).reshape(1, -1, 1, 1) for v in normalize)
    return (x - mean) / std


def _crops(x, patch, step):
    """Every patch, in map order: (N * ny * nx, C, patch, patch) and (ny, nx)."""
    n, _, h, w = x.shape
    ny, nx = (h - patch) // step + 1, (w - patch) // step + 1
    crops = [x[b:b + 1, :, i * step:i * step + patch, j * step:j * step + patch]
             for b in range(n) for i in range(ny) for j in range(nx)]
    return torch.cat(crops), (ny, nx)


def _literal_loop(model, x, patch, step, normalize=None):
    """The definition: the model on each patch on its own (batch 1)."""
    crops, (ny, nx) = _crops(_normalized(x, normalize), patch, step)
    with torch.inference_mode():
        y = torch.cat([model(c[None]).reshape(1, -1) for c in crops])
    return y.reshape(x.shape[0], ny, nx, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------ the rounding bound


def _first_order_bound(model, x):
    """(B, K): a first-order bound on |f_float64(x) - f(x)| for each patch and class.

    Every rounding site l (a Conv2d, BatchNorm2d, Linear, global average pool, Softmax, the
    residual addition of a block) perturbs its output z_l by at most delta_l (Higham 3.1:
    gamma_{n+2} * (|W| * |a| + |b|) for a sum of n products; 8 roundings for BatchNorm in
    eval; one for the addition); ReLU, max pooling, cropping and views are exact. To first
    order the logit y_k moves by sum_l |dy_k / dz_l| . delta_l (terms O(u^2) dropped, ~1e-30
    here); the gradients come from autograd at the float64 evaluation. Both paths are float64
    evaluations of f, so they differ by at most twice this."""
    net = copy.deepcopy(model).double().eval()
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    terms = []

    def hook(m, args, out):
        a = args[0]
        if isinstance(m, nn.Conv2d):
            n = m.weight[0].numel() + (m.bias is not None) + 2
            d = gamma(n, F64) * F.conv2d(a.abs(), m.weight.abs(), None if m.bias is None else m.bias.abs(),
                                         m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.BatchNorm2d):
            s = (m.weight / torch.sqrt(m.running_var + m.eps)).reshape(1, -1, 1, 1)
            d = gamma(8, F64) * (s.abs() * (a.abs() + m.running_mean.abs().reshape(1, -1, 1, 1))
                                 + m.bias.abs().reshape(1, -1, 1, 1))
        elif isinstance(m, nn.Linear):
            d = gamma(m.in_features + 3, F64) * (a.abs() @ m.weight.abs().T + (0 if m.bias is None else m.bias.abs()))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            assert out.shape[-2:] == (1, 1), "global pooling only"
            d = gamma(a.shape[-1] * a.shape[-2] + 2, F64) * a.abs().mean((2, 3), keepdim=True)
        elif isinstance(m, nn.Softmax):
            d = gamma(out.shape[m.dim] + 4, F64) * out.abs()  # exp, the sum of K, the division
        elif isinstance(m, (BasicBlock, Bottleneck)):
            d = gamma(1, F64) * out.abs()  # the addition, seen through the block's final ReLU
        else:
            return
        out.retain_grad()
        terms.append((out, d.detach()))

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    y = net(x.double()).flatten(1)
    for h in handles:
        h.remove()
    bound = torch.zeros_like(y)
    for k in range(y.shape[1]):
        for t, _ in terms:
            t.grad = None
        y[:, k].sum().backward(retain_graph=True)  # patches are independent: per-patch gradients
        bound[:, k] = sum((t.grad.abs() * d).flatten(1).sum(1) for t, d in terms)
    return bound.detach()


def _assert_close_to_loop(out, loop, model, x, patch, step, normalize):
    crops, _ = _crops(_normalized(x, normalize), patch, step)
    bound = _first_order_bound(model, crops).reshape(loop.shape[0], loop.shape[2], loop.shape[3], -1).permute(0, 3, 1, 2)
    assert out.shape == loop.shape, f"{tuple(out.shape)} != {tuple(loop.shape)}"
    bad = (out - loop).abs() > 2 * bound
    assert not bad.any(), _where(bad, out, loop, 2 * bound)


# ------------------------------------------------------------------ equality with the loop

_LOOPS = {}


@pytest.mark.parametrize("step", [1, 5, 7, 13])
@pytest.mark.parametrize("batch_size", [1, 3, 10_000])
def test_equals_literal_loop(step, batch_size):
    model = _seeded_resnet()
    x = _roi()[:, :, :, 1:]  # non-contiguous: 45 x 51
    if step == 1:
        x = x[:1, :, :38, :40]  # 7 x 9 patches
    normalize = NORM if batch_size == 3 else None
    key = (step, normalize)
    if key not in _LOOPS:
        _LOOPS[key] = _literal_loop(model, x, PATCH, step, normalize)
    pm = PatchModel(model, PATCH, step, batch_size=batch_size, normalize=normalize)
    with torch.inference_mode():
        out = pm(x)
    assert out.dtype == F64 and pm.input_dtype == F64
    _assert_close_to_loop(out, _LOOPS[key], model, x, PATCH, step, normalize)


def test_blocks_tile_the_batch_in_map_order():
    """Each batch is cut into rectangles of the map (parts of a row, runs of whole rows) that
    cover its patches once, in order: at most 3 per image."""
    for n, ny, nx, b in product((1, 2), (1, 3), (1, 4), (1, 3, 5, 12, 100)):
        seen = []
        for k0 in range(0, n * ny * nx, b):
            k1 = min(k0 + b, n * ny * nx)
            blocks = list(_blocks(k0, k1, ny, nx))
            assert len(blocks) <= 3 * len({img for img, *_ in blocks})
            for img, rows, cols, off, count in blocks:
                assert off == len(seen) - k0 and count == (rows.stop - rows.start) * (cols.stop - cols.start)
                seen += [(img, i, j) for i in range(rows.start, rows.stop) for j in range(cols.start, cols.stop)]
        assert seen == list(product(range(n), range(ny), range(nx)))


def test_bf16_within_twice_pytorch_error():
    model = _seeded_resnet(dtype=torch.float32)
    x = _roi(n=1, h=48, w=40, dtype=torch.float32)
    pm = PatchModel(model, PATCH, 8, precision="bf16", normalize=NORM, batch_size=4)
    with torch.inference_mode():
        out = pm(x)
    assert out.dtype == torch.float32 and pm.input_dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    crops, (ny, nx) = _crops(_normalized(x, NORM).to(torch.bfloat16), PATCH, 8)  # what both paths feed
    m16 = _seeded_resnet(dtype=torch.bfloat16)
    with torch.inference_mode():
        theirs = m16(crops).float()
        ref = m16.double()(crops.double())
    as_map = lambda y: y.reshape(1, ny, nx, -1).permute(0, 3, 1, 2)  # noqa: E731
    assert_low_precision(out, as_map(theirs), as_map(ref))


class _Head4d(nn.Module):
    """Padded conv, global pool, 1x1 classifier: (B, K, 1, 1) outputs; optional softmax."""

    def __init__(self, softmax=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(4, 2, 1), *([nn.Softmax(dim=1)] if softmax else []))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("softmax", [False, True])
def test_4d_outputs_and_softmax(softmax):
    torch.manual_seed(0)
    model = _Head4d(softmax).double().eval()
    x = _roi(n=1, h=20, w=17)
    pm = PatchModel(model, 9, 4, batch_size=2)
    out = pm(x)
    assert out.shape == (1, 2, 3, 3)
    _assert_close_to_loop(out, _literal_loop(model, x, 9, 4), model, x, 9, 4, None)
    assert pm.ends_with_softmax is softmax
    assert PatchModel(_seeded_resnet(), PATCH, 8).ends_with_softmax is False
    assert PatchModel(nn.Sequential(nn.Conv2d(3, 2, 9), nn.Flatten(), nn.Softmax(-1)), 9, 4).ends_with_softmax


def test_rejects_spatial_outputs_and_bad_arguments():
    with pytest.raises(InvalidArgumentError, match=r"\(B, K\) or \(B, K, 1, 1\)"):
        PatchModel(nn.Conv2d(3, 2, 3), 9, 4)(torch.rand(1, 3, 12, 12))
    model = _seeded_resnet()
    for kwargs, match in ((dict(patch=0, step=1), "patch"), (dict(patch=8, step=1.5), "step"),
                          (dict(patch=8, step=2, precision="fp16"), "precision"),
                          (dict(patch=8, step=2, batch_size=0), "batch_size"),
                          (dict(patch=8, step=2, normalize=((0.5,), (0.2,))), "channels")):
        with pytest.raises(InvalidArgumentError, match=match):
            PatchModel(model, **kwargs)
    pm = PatchModel(model, PATCH, 8)
    for bad in (torch.rand(1, 3, 31, 40, dtype=F64), torch.rand(3, 40, 40, dtype=F64),
                torch.zeros(1, 3, 40, 40, dtype=torch.uint8), torch.rand(1, 4, 40, 40, dtype=F64)):
        with pytest.raises(InvalidArgumentError, match=r"\(N, 3, H, W\)"):
            pm(bad)
    assert pm(torch.rand(0, 3, 40, 40, dtype=F64)).shape == (0, 3, 2, 2)


def test_model_not_modified_and_interface():
    model = resnet18(2, width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = PatchModel(model, 64, 16, normalize=NORM)
    pm(torch.rand(1, 3, 80, 80))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not pm.model.training and not any(p.requires_grad for p in pm.model.parameters())
    g = pm.geometry
    assert (g.patch, g.stride, g.alpha, g.step, pm.plan, pm.precision) == (64, 16, 1, 16, "patch", "fp32")
    assert g.input_side(3) == 96 and g.output_side(96) == 3
    assert pm.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ memory and cost


def _leaf_pairs(model):
    """Hooks on the leaf modules: the largest input + output bytes of one call."""
    peak = [0]

    def hook(m, args, out):
        peak[0] = max(peak[0], sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))
                      + out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    return peak, [m.register_forward_hook(hook) for m in leaves]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_bytes_cover_measured_peak(precision):
    model = resnet50(2, width=4).eval()
    pm = PatchModel(model, 64, 16, precision=precision, batch_size=8, normalize=NORM)
    peak, handles = _leaf_pairs(pm.model)
    with torch.inference_mode():
        pm(torch.rand(1, 3, 112, 112))  # 16 patches: two batches of 8
    for h in handles:
        h.remove()
    item = 2 if precision == "bf16" else 4
    batch = 8 * 3 * 64 * 64 * item
    assert pm.activation_bytes(112) >= peak[0] + batch
    assert pm.activation_bytes(64) < pm.activation_bytes(112)  # one patch: a batch of 1


def test_default_batch_fits_memory():
    model = resnet18(2, width=8)
    per = PatchModel(model, 64, 16, batch_size=1).activation_bytes(64)  # one patch + its output
    pm = PatchModel(model, 64, 16, memory=20 * per)
    assert pm.batch_size == 16
    assert PatchModel(model, 64, 16).batch_size == 256  # 1 GiB
    assert PatchModel(model, 64, 16, memory=1).batch_size == 1


def test_multiply_adds_equal_hooks_count():
    counted = [0]

    def hook(m, args, out):
        k = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
        counted[0] += out.numel() * k

    pm = PatchModel(resnet50(2, width=4), 64, 24, batch_size=5)
    per_patch = pm.multiply_adds(64)  # probes once, before the hooks
    for m in pm.model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        pm(torch.rand(1, 3, 150, 130))  # 4 x 3 patches
    assert pm.multiply_adds(150) == 16 * pm.multiply_adds(64)
    assert counted[0] == 12 * per_patch
    # the published count for ResNet-18 at 224 px: 1.81 GMACs (torchvision's "GFLOPS")
    assert round(PatchModel(resnet18(1000), 224, 32).multiply_adds(224) / 1e7) == 181


def test_dense_savings_equals_dense_model_cost_when_padding_free():
    """For a padding-free conv net at step == stride, the estimate is exactly the ratio of
    PatchModel's to DenseModel's multiply-adds."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 2, 3)).eval()
    g = geometry(net)
    side = g.input_side(20)
    pm, dense = PatchModel(net, g.patch, g.stride), to_dense(net)
    assert dense_savings(net, g.patch, g.stride, side) == pytest.approx(
        pm.multiply_adds(side) / dense.multiply_adds(side), rel=1e-12)
    # 64 px patches 16 px apart: 16x the pixels of a stride-16 map; a stride-32 trunk
    # counted once per each of the (32 / 16)^2 phases: ~16 / 4
    model = resnet18(2, width=8)  # training mode: dense_savings must leave it so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert 3.5 < dense_savings(model, 64, 16, 64 + 63 * 16) < 4
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ torchvision compatibility


def _torchvision_resnet18_keys(num_classes=1000):
    """resnet18's state dict as torchvision names it, written from the architecture."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    cin = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            shapes[f"{p}.conv1.weight"] = (c, cin, 3, 3)
            bn(f"{p}.bn1", c)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if b == 0 and stage > 1:
                shapes[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                bn(f"{p}.downsample.1", c)
            cin = c
    shapes.update({"fc.weight": (num_classes, 512), "fc.bias": (num_classes,)})
    return shapes


def test_torchvision_state_dict_loads_strictly():
    shapes = _torchvision_resnet18_keys()
    assert len(shapes) == 122
    g = torch.Generator().manual_seed(0)
    state = {k: torch.tensor(7) if not s else torch.rand(s, generator=g) + (k.endswith("running_var"))
             for k, s in shapes.items()}
    model = resnet18(1000)
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(resnet50().state_dict()) == 320  # torchvision's resnet50 has 320 entries
    assert isinstance(model.layer1[0], BasicBlock)


def test_docstring_examples():
    for mod in (patch_module, resnet_module):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
