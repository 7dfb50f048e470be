"""to_dense on graphs (residual additions with cropped skips, concatenations, grouped and
depthwise convolutions, BatchNorm, pools, normalisation): the dense map equals the literal
patch loop of the original model (DESIGN.md 2.2), within a rounding bound propagated
through the model's own torch.fx graph."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import seeded as _seeded, UNIT_ROUNDOFF, _where, assert_low_precision, gamma, patch_loop
from pyfastscan import InvalidArgumentError, geometry, to_dense
from pyfastscan.nn import Normalize


# ----------------------------------------------------------------------------- models

class ResBlock(nn.Module):
    """conv(k1, stride) - BN - act - conv(k2) (+ BN) plus the skip, cropped by ``a`` positions
    before and ``b`` after (a + b = the main path's shrinkage), then act. A strided block takes
    every other skip pixel by a 1x1 stride-2 convolution ("conv") or a strided crop ("slice")."""

    def __init__(self, cin, cout, k1=3, k2=3, stride=1, a=None, skip="conv", groups=(1, 1), bn=True, act=F.relu):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k1, stride, groups=groups[0], bias=not bn)
        self.bn1 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, k2, groups=groups[1])
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = act
        total = (k1 - 1) + stride * (k2 - 1)
        self.a = total // 2 if a is None else a
        self.b = total - self.a
        self.stride = stride
        self.down = None
        if skip == "conv" and (stride != 1 or cin != cout):
            self.down = nn.Conv2d(cin, cout, 1, stride, bias=False)
        elif cin != cout:
            raise ValueError("a slice skip needs cin == cout")

    def forward(self, x):
        a, b, s = self.a, self.b, self.stride
        if self.down is not None:
            skip = self.down(x[..., a:-b, a:-b] if b else x[..., a:, a:])
        else:
            skip = x[..., a:-b:s, a:-b:s] if b else x[..., a::s, a::s]
        main = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(main + skip)


class CatBlock(nn.Module):
    """Two branches (a kA convolution, and a kB convolution or a stride-1 max pool) cropped
    to one size and concatenated over channels."""

    def __init__(self, cin, ca, cb, ka=3, kb=1, pool=False, a=None):
        super().__init__()
        self.left = nn.Conv2d(cin, ca, ka)
        self.right = nn.MaxPool2d(kb, 1) if pool else nn.Conv2d(cin, cb, kb, groups=cin if cb % cin == 0 else 1)
        self.out_channels = ca + (cin if pool else cb)
        d = ka - kb
        self.crop_left, total = d < 0, abs(d)
        self.a = total // 2 if a is None else min(a, total)
        self.b = total - self.a

    def forward(self, x):
        left, right = self.left(x), self.right(x)
        a, b = self.a, self.b
        if self.crop_left:
            left = left[:, :, a:left.shape[-2] - b, a:left.shape[-1] - b]  # a crop written with sizes
        else:
            right = right[..., a:-b, a:-b] if b else right[..., a:, a:]
        return torch.tanh(torch.cat([left, right], dim=1))


class ResidualFCN(nn.Module):
    """Padding-free ResNet-like patch classifier: a 3x3 stem, three residual blocks with
    cropped skips (the second strided with a 1x1 stride-2 skip convolution, the third with
    a strided crop), a 1x1 classifier and a softmax over channels. Stride 4."""

    def __init__(self, width=4, classes=2, head="conv"):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = ResBlock(w, w)
        self.layer2 = ResBlock(w, 2 * w, stride=2, skip="conv")
        self.layer3 = ResBlock(2 * w, 2 * w, stride=2, skip="slice", groups=(2, 2 * w))
        if head == "conv":
            self.head = nn.Conv2d(2 * w, classes, 1)
        else:  # Flatten + Linear on the 3 x 3 map of a patch
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 9, classes))
        self.linear = head != "conv"

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        if self.linear:  # a functional pool, a channel slice, then Flatten + Linear on 3 x 3
            x = F.max_pool2d(x, 2, 1)
            x = torch.cat([x, -x], dim=1)[:, : x.shape[1]]
        return F.softmax(self.head(x), dim=1)


def _input(geo, map_side, dtype=torch.float64, n=1, seed=1, extra=0):
    side = geo.input_side(map_side)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side + extra, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- the rounding bound

_LIPSCHITZ = {"relu": 1.0, "neg": 1.0, "tanh": 1.0, "sigmoid": 0.25, "elu": 1.0, "ReLU": 1.0, "Tanh": 1.0, "ELU": 1.0,
              "Sigmoid": 0.25, "SiLU": 1.1, "GELU": 1.13, "LeakyReLU": 1.0}


class _Leaf(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


class _B:
    """A value of the float64 evaluation ``a``, a bound ``e`` on the error of evaluating it in
    the test's dtype, and for a linear op the sum of |terms| ``s`` with its count ``n``.
    ``norm`` = (input, std, mean) when the value is a Normalize output (folded downstream)."""

    def __init__(self, a, e, s=None, n=1, norm=None):
        self.a, self.e, self.s, self.n, self.norm = a, e, a.abs() if s is None else s, n, norm


class _ErrorBound(fx.Interpreter):
    """|f_dtype(x) - f(x)| <= e elementwise for both the patch loop and the dense model, with the
    rules of tests/helpers.py (Higham's gamma_n, DESIGN.md 5), and for what graphs add:

    * conv: e' = |W| * e + gamma_{n+2} (|W| * |a| + |b|), n = taps + 1.
    * conv reading Normalize (dense folds it: w/std, b - sum w mean/std, then a conv of n taps on
      the raw input; the loop normalises, two roundings, then convolves):
      e' = |W| * (e / std) + gamma_{2n+6} (|W| * (|x| / std) + |W| * (|mean| / std) + |b|).
    * BatchNorm (folded into the conv before it, or applied: (z - mean) * scale + shift with scale
      from a square root and a division): e' = (1 + gamma_4) |scale| e
      + gamma_{n+12} (|scale| (s + |mean|) + |shift|), s, n those of the conv before it.
    * add / sub: (1 + u)(e1 + e2) + u |a'|; scalar multiply: (1 + u)|c| e + u |a'|.
    * softmax over channels (its Jacobian's rows sum to at most 1/2): max_c e + gamma_{K+6} |a'|.
    * max pool passes the largest error; average pooling averages it plus gamma_{k^2+2} avg |a|;
      crops and concatenations carry the errors along; pointwise f: L e + 2u |a'|.
    """

    def __init__(self, model, dtype):
        super().__init__(fx.GraphModule(model, _Leaf().trace(model)))
        self.dtype, self.u = dtype, UNIT_ROUNDOFF[dtype]

    def g(self, n):
        return gamma(n, self.dtype)

    def run_node(self, node):
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        if node.op == "placeholder":
            x = next(self.args_iter)
            return _B(x, torch.zeros_like(x))
        if node.op == "output":
            return args[0]
        if node.op == "call_module":
            return self._layer(self.submodules[node.target], args[0])
        return self._function(node.target, node.op == "call_method", args, kwargs)

    def conv(self, m, x: _B):
        w, b = m.weight, m.bias
        n = w[0].numel() + 1
        conv = lambda t, wt, bias=None: F.conv2d(t, wt, bias, m.stride, 0, m.dilation, m.groups)  # noqa: E731
        a = conv(x.a, w, b)
        bias = None if b is None else b.abs()
        if x.norm is not None:
            raw, std, mean = x.norm
            t = conv(raw.a.abs() / std, w.abs(), bias) + conv(torch.ones_like(raw.a) * mean.abs() / std, w.abs())
            return _B(a, conv(raw.e / std, w.abs()) + self.g(2 * n + 6) * t, t, n)
        s = conv(x.a.abs(), w.abs(), bias)
        return _B(a, conv(x.e, w.abs()) + self.g(n + 2) * s, s, n)

    def _layer(self, m, x):
        u = self.u
        if isinstance(m, nn.Conv2d):
            return self.conv(m, x)
        if isinstance(m, nn.BatchNorm2d):
            view = (1, -1, 1, 1)
            scale = (m.weight / torch.sqrt(m.running_var + m.eps)).reshape(view)
            shift = m.bias.reshape(view) - m.running_mean.reshape(view) * scale
            mean = m.running_mean.reshape(view)
            e = (1 + self.g(4)) * scale.abs() * x.e + self.g(x.n + 12) * (scale.abs() * (x.s + mean.abs())
                                                                         + shift.abs())
            return _B(m(x.a), e)
        if isinstance(m, Normalize):
            std, mean = m.std.reshape(1, -1, 1, 1), m.mean.reshape(1, -1, 1, 1)
            a = m(x.a)
            return _B(a, x.e / std + self.g(2) * (x.a.abs() + mean.abs()) / std, norm=(x, std, mean))
        if isinstance(m, nn.MaxPool2d):
            return _B(m(x.a), m(x.e))
        if isinstance(m, nn.AvgPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            return _B(m(x.a), m(x.e) + self.g(k * k + 2) * m(x.a.abs()))
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.Flatten):
            return _B(m(x.a), m(x.e))
        if isinstance(m, nn.Linear):
            n = m.in_features + 1
            s = F.linear(x.a.abs(), m.weight.abs(), m.bias.abs())
            return _B(m(x.a), F.linear(x.e, m.weight.abs()) + self.g(n + 2) * s, s, n)
        if isinstance(m, nn.Softmax):
            return self.softmax(m(x.a), x)
        a = m(x.a)
        return _B(a, _LIPSCHITZ[type(m).__name__] * x.e + 2 * u * a.abs())

    def softmax(self, a, x):
        return _B(a, x.e.amax(dim=1, keepdim=True) + self.g(a.shape[1] + 6) * a.abs())

    def _function(self, fn, method, args, kwargs):
        u = self.u
        x = args[0] if args else None
        if not isinstance(x, _B) and not (fn in (operator.add, operator.mul) and any(isinstance(v, _B) for v in args)) \
                and not (fn is torch.cat):
            return getattr(x, fn)(*args[1:], **kwargs) if method else fn(*args, **kwargs)
        name = fn if method else getattr(fn, "__name__", "")
        if fn is getattr:
            return getattr(x.a, args[1])
        if name in ("size",):
            return x.a.size(*args[1:])
        if fn is operator.getitem:
            return _B(x.a[args[1]], x.e[args[1]])
        if fn is torch.cat:
            parts = args[0]
            return _B(torch.cat([p.a for p in parts], **kwargs), torch.cat([p.e for p in parts], **kwargs))
        if name in ("add", "sub", "iadd"):
            p, q = args
            if isinstance(p, _B) and isinstance(q, _B):
                a = p.a + q.a if name != "sub" else p.a - q.a
                return _B(a, (1 + u) * (p.e + q.e) + u * a.abs())
            t, c = (p, q) if isinstance(p, _B) else (q, p)
            a = t.a + c if name != "sub" else (t.a - c if t is p else c - t.a)
            return _B(a, (1 + u) * t.e + u * a.abs())
        if name in ("mul",) and not all(isinstance(v, _B) for v in args):
            t, c = (args[0], args[1]) if isinstance(args[0], _B) else (args[1], args[0])
            a = t.a * c
            return _B(a, (1 + u) * abs(c) * t.e + u * a.abs())
        if name == "softmax":
            return self.softmax(F.softmax(x.a, dim=1), x)
        if name in ("max_pool2d",):
            return _B(F.max_pool2d(x.a, *args[1:], **kwargs), F.max_pool2d(x.e, *args[1:], **kwargs))
        if name == "flatten":
            return _B(torch.flatten(x.a, *args[1:]), torch.flatten(x.e, *args[1:]))
        a = getattr(x.a, fn)(*args[1:], **kwargs) if method else fn(x.a, *args[1:], **kwargs)
        return _B(a, _LIPSCHITZ[name] * x.e + 2 * u * a.abs())


def assert_graph_dense_equals_patch_loop(model, dense, x, normalize=None):
    """DESIGN.md 2.2: dense(x) equals the literal patch loop of ``model`` (on (x - mean) / std
    when ``normalize`` is given), within twice the propagated rounding bound."""
    g = dense.geometry
    ref = model if normalize is None else nn.Sequential(Normalize(*normalize, dtype=torch.float64), model)
    with torch.no_grad():
        out = dense(x)
        loop = patch_loop(ref, x, g.patch, g.step)
        assert out.shape == loop.shape, f"dense map {tuple(out.shape)} != patch loop {tuple(loop.shape)}"
        crops = [x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch].double()
                 for i in range(loop.shape[2]) for j in range(loop.shape[3])]
        bound = _ErrorBound(ref.double(), x.dtype).run(torch.cat(crops)).e
    bound = bound.reshape(len(crops), x.shape[0], -1).permute(1, 2, 0).reshape(loop.shape)
    err = (out.double() - loop.double()).abs()
    bad = err > 2 * bound
    assert not bad.any(), _where(bad, out.double(), loop.double(), 2 * bound)


def _divisors(n, cap=8):
    return [a for a in range(1, min(n, cap) + 1) if n % a == 0]


# ----------------------------------------------------------------------------- hand-written nets

@pytest.mark.parametrize("head", ["conv", "linear"])
def test_residual_fcn_dense_equals_patch_loop(head):
    model = _seeded(ResidualFCN(width=2, head=head))
    geo = geometry(model)
    assert geo.stride == 4 and geo.patch == _brute_patch(model)
    for alpha in (1, 2, 4):
        dense = to_dense(model, alpha)
        assert dense.ends_with_softmax and dense.plan == "minimal" and dense.geometry.alpha == alpha
        assert_graph_dense_equals_patch_loop(model, dense, _input(dense.geometry, alpha + 1, n=2, extra=3))


def _brute_patch(model):
    """The smallest input on which the model gives a single output."""
    with torch.no_grad():
        for side in range(1, 200):
            try:
                out = model(torch.zeros(1, 3, side, side, dtype=torch.float64))
            except RuntimeError:
                continue
            if out.dim() == 2 or out.shape[-1] == 1:
                return side
    return None


def test_original_graph_model_not_modified_and_dense_is_frozen():
    model = _seeded(ResidualFCN(width=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = to_dense(model, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.layer2.conv1.stride == (2, 2) and model.layer1.bn1 is not None
    assert not any(p.requires_grad for p in dense.parameters()) and not dense.training
    assert "plan='minimal'" in repr(dense)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dense.modules())  # every BN follows a conv: folded


def test_paper_plan_is_for_chains_only():
    with pytest.raises(InvalidArgumentError, match=r"plan='paper' is defined for chains only; use plan='minimal'"):
        to_dense(_seeded(ResidualFCN(width=2)), 2, plan="paper")


class _Chain(nn.Module):
    """A chain written as a Module (not a Sequential): traced, then converted as a chain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.conv2 = nn.Conv2d(4, 2, 2, stride=2)

    def forward(self, x):
        return self.conv2(self.dw(self.pool(self.act(self.bn(self.conv1(x))))))


@pytest.mark.parametrize("plan", ["minimal", "paper"])
def test_module_chain_takes_both_plans(plan):
    model = _seeded(_Chain())
    for alpha in (1, 2, 4):
        try:
            dense = to_dense(model, alpha, plan=plan)
        except InvalidArgumentError as exc:  # the depthwise conv after the reconstruction layer
            assert plan == "paper" and "groups=1 only" in str(exc) and alpha > 1
            continue
        assert isinstance(dense.layers, nn.Sequential) and not dense.ends_with_softmax
        assert_graph_dense_equals_patch_loop(model, dense, _input(dense.geometry, alpha + 2))


@pytest.mark.parametrize("alpha", [1, 3])
def test_depthwise_and_grouped_convolutions_in_a_sequential(alpha):
    model = _seeded(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ELU(), nn.Conv2d(6, 6, 3, groups=3), nn.AvgPool2d(3),
                                  nn.Conv2d(6, 6, 3, groups=6), nn.Tanh(), nn.Conv2d(6, 2, 1)))
    dense = to_dense(model, alpha)
    assert_graph_dense_equals_patch_loop(model, dense, _input(dense.geometry, 4))


# ----------------------------------------------------------------------------- normalisation

_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _InputToPoolAndSkip(nn.Module):
    """The input feeds a pool (not foldable) and a crop on the skip as well as a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.pooled = nn.Conv2d(3, 3, 2)

    def forward(self, x):
        y = self.conv(x) + x[..., 1:-1, 1:-1]
        return self.pooled(F.max_pool2d(x, 3, 1)) * 0.5 + self.pooled(y)


@pytest.mark.parametrize("name", ["residual", "sequential", "pool_first", "module"])
def test_normalize_equals_patch_loop_on_the_normalised_input(name):
    if name == "residual":
        model = _seeded(ResidualFCN(width=2))
    elif name == "sequential":
        model = _seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3)))
    elif name == "pool_first":
        model = _seeded(_InputToPoolAndSkip())
    else:  # the model normalises itself; to_dense folds its Normalize too
        model = _seeded(nn.Sequential(Normalize(*_NORM, dtype=torch.float64), ResidualFCN(width=2)))
    normalize = None if name == "module" else _NORM
    for alpha in _divisors(geometry(model).stride, 4):
        dense = to_dense(model, alpha, normalize=normalize)
        if name in ("residual", "sequential", "module"):  # folded: no Normalize left
            assert not any(isinstance(m, Normalize) for m in dense.modules())
        assert_graph_dense_equals_patch_loop(model, dense, _input(dense.geometry, alpha + 1), normalize)


def test_normalize_is_checked():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(InvalidArgumentError, match="same, nonzero length"):
        to_dense(model, normalize=((0.5, 0.5), (0.2,)))
    with pytest.raises(InvalidArgumentError, match="std positive"):
        to_dense(model, normalize=((0.5,) * 3, (0.2, 0.0, 0.1)))
    with pytest.raises(InvalidArgumentError, match="3 input channels, the normalisation has 2"):
        to_dense(model, normalize=((0.5, 0.5), (0.2, 0.2)))


# ----------------------------------------------------------------------------- generated graphs

_ACTS = [F.relu, torch.tanh, nn.ELU(), nn.SiLU()]


@st.composite
def _graphs(draw):
    """A 1-3 px stem, then 1-3 blocks: residual (stride 1 or 2; skip cropped off-centre or not;
    a 1x1 stride-2 convolution or a strided crop on a strided skip; grouped or depthwise
    convolutions; BatchNorm or not), concatenation (conv/conv or conv/pool branches cropped to
    one size), or a max/avg pool; a 1x1 classifier, with a softmax or not."""
    c = draw(st.sampled_from([2, 4]))
    layers = [nn.Conv2d(3, c, draw(st.integers(1, 3))), draw(st.sampled_from([nn.ReLU(), nn.Tanh()]))]
    strided = 0
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["res", "res", "cat", "pool"]))
        if kind == "res":
            stride = draw(st.integers(1, 2)) if strided < 2 else 1
            strided += stride == 2
            k1, k2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            total = (k1 - 1) + stride * (k2 - 1)
            skip = draw(st.sampled_from(["conv", "slice"]))
            cout = draw(st.sampled_from([c, 2 * c])) if skip == "conv" else c
            g1 = draw(st.sampled_from(sorted({g for g in (1, 2, c) if c % g == 0 and cout % g == 0})))
            g2 = draw(st.sampled_from(sorted({g for g in (1, 2, cout) if cout % g == 0})))
            layers.append(ResBlock(c, cout, k1, k2, stride, draw(st.integers(0, total)), skip, (g1, g2),
                                   draw(st.booleans()), draw(st.sampled_from(_ACTS))))
            c = cout
        elif kind == "cat":
            ka, kb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            pool = draw(st.booleans()) and kb > 1
            block = CatBlock(c, draw(st.integers(1, 3)), draw(st.sampled_from([c, 2 * c])), ka, kb, pool,
                             draw(st.integers(0, 2)))
            layers.append(block)
            c = block.out_channels
        else:
            k, s = draw(st.integers(2, 3)), draw(st.integers(1, 2))
            strided += s == 2
            layers.append(nn.MaxPool2d(k, s) if draw(st.booleans()) else nn.AvgPool2d(k, s))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(c))  # after a pool: applied pointwise
    layers.append(nn.Conv2d(c, 2, 1))
    if draw(st.booleans()):
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=_graphs(), extra=st.integers(0, 2), plan=st.sampled_from(["minimal", "minimal", "paper"]))
def test_generated_graphs_dense_equals_patch_loop(net, extra, plan):
    """Every alpha dividing the stride (up to 8), map sides up to 4 + 2; draws whose
    map_side^2 * patch^2 exceeds 4 million pixels are skipped (the bound holds every patch)."""
    model = _seeded(net)
    geo = geometry(model)
    assert geo.patch == _brute_patch(model)
    for alpha in _divisors(geo.stride):
        map_side = min(alpha, 4) + extra
        assume(map_side * map_side * geo.patch * geo.patch <= 4_000_000)
        try:
            dense = to_dense(model, alpha, plan=plan)
        except InvalidArgumentError as exc:
            assert plan == "paper" and "chains only" in str(exc)
            return
        if plan == "paper":  # converted: the draw was a chain (no residual or concatenation block)
            assert not any(isinstance(m, (ResBlock, CatBlock)) for m in net.modules())
        assert dense.ends_with_softmax == isinstance(net[-1], nn.Softmax)
        assert_graph_dense_equals_patch_loop(model, dense, _input(dense.geometry, map_side))


# ----------------------------------------------------------------------------- cost models

class _Recorder(fx.Interpreter):
    """Runs the dense graph, recording every node's tensors."""

    def __init__(self, gm):
        super().__init__(gm)
        self.pairs, self.macs = [], 0

    def run_node(self, node):
        out = super().run_node(node)
        if node.op in ("call_module", "call_function", "call_method"):
            ins = [self.env[a] for a in node.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)
                   and a.op != "get_attr"]
            self.pairs.append(sum(t.numel() * t.element_size() for t in ins) + out.numel() * out.element_size())
            if node.op == "call_module" and isinstance(self.submodules[node.target], nn.Conv2d):
                self.macs += out.shape[-2] * out.shape[-1] * self.submodules[node.target].weight.numel()
        return out


@pytest.mark.parametrize("alpha,precision", [(1, "fp32"), (4, "fp32"), (2, "bf16")])
def test_graph_cost_models_match_the_tensors_that_run(alpha, precision):
    """multiply_adds and activation_bytes of a graph equal the convolutions' output shapes and
    the largest inputs + output of a node that actually run."""
    model = _seeded(ResidualFCN(width=2), dtype=torch.float32)
    dense = to_dense(model, alpha, precision=precision, normalize=_NORM)
    side = dense.geometry.input_side(5) + 3
    x = torch.zeros(1, 3, side, side)
    if precision == "bf16":
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    rec = _Recorder(dense.layers)
    with torch.no_grad():
        rec.run(x)
    assert dense.multiply_adds(side) == rec.macs and dense.activation_bytes(side) == max(rec.pairs)


def test_bf16_graph_within_twice_pytorch_bf16_error():
    """DESIGN.md 5 low-precision rule, against the float32 patch loop."""
    model = _seeded(ResidualFCN(width=4), dtype=torch.float32)
    dense = to_dense(model, 2, precision="bf16")
    x = _input(dense.geometry, 4, torch.float32)
    with torch.no_grad():
        out = dense(x)
        ref = patch_loop(model, x, dense.geometry.patch, dense.geometry.step)
        cl = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = patch_loop(cl, x.contiguous(memory_format=torch.channels_last), dense.geometry.patch,
                                dense.geometry.step).float()
    assert out.dtype == torch.float32 and dense.input_dtype == torch.float32
    assert_low_precision(out, theirs, ref)


def test_geometry_and_softmax_flag_of_chains():
    chain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 2, 2), nn.Softmax(dim=1))
    assert to_dense(chain, 2).ends_with_softmax and not to_dense(chain[:-1], 2).ends_with_softmax
    assert geometry(ResidualFCN().eval()) == geometry(_seeded(ResidualFCN(width=2)))


# ----------------------------------------------------------------------------- refused networks

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: 3x3 convolutions with padding 1."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _ResNet(nn.Module):
    def __init__(self, block, pool=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.layer1 = nn.Sequential(block(4))
        self.avgpool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.conv1(x))), 1))


class _Uncropped(BasicBlock):
    def __init__(self, c):
        super().__init__(c)
        self.conv1.padding = self.conv2.padding = (0, 0)


class _Cropped(_Uncropped):
    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x[..., 2:-2, 2:-2])


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.conv = fn, nn.Conv2d(3, 3, 3, stride=2)

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize("model,message", [
    (_ResNet(BasicBlock), r"^conv1 of layer1\.0 has padding 1; dense scanning needs padding-free"),
    (_ResNet(_Cropped), r"^AdaptiveAvgPool2d at avgpool: global pooling makes every output depend on the whole"),
    (_ResNet(_Uncropped), r"^add at layer1\.0\.add: the skip path is not cropped to the main path \(sizes differ "
                          r"by 4 at stride 1\)"),
    (_Lambda(lambda s, x: s.conv(x) + x[..., 1:-1, 1:-1]), r"add at add: adds maps of cumulative strides 2 and 1"),
    (_Lambda(lambda s, x: x if x.sum() > 0 else s.conv(x)), r"torch\.fx cannot trace _Lambda \(TraceError"),
    (_Lambda(lambda s, x: s.conv(x[..., 2:9, 2:9])), r"getitem at getitem slices the spatial axes with"),
    (_Lambda(lambda s, x: s.conv(x)[..., 1:-1, 2:-2]), r"crops rows .* and columns .* differently"),
    (_Lambda(lambda s, x: s.conv(x).mean((2, 3), keepdim=True)), r"mean at mean: global pooling"),
    (_Lambda(lambda s, x: F.interpolate(s.conv(x), scale_factor=2)), r"unsupported operation interpolate"),
    (_Lambda(lambda s, x: s.conv(x).view(1, -1)), r"unsupported operation view"),
    (_Lambda(lambda s, x: torch.cat([s.conv(x), s.conv(x)], dim=2)), r"concatenates along dim 2"),
    (_Lambda(lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1))), r"unsupported operation pad"),
    (_Lambda(lambda s, x: s.conv(x)[..., : x.shape[-1] // 2, :]), r"crops may use constants and sizes plus"),
])
def test_refused_graphs_say_which_node_and_why(model, message):
    with pytest.raises(InvalidArgumentError, match=message):
        to_dense(model.eval(), 1)


def test_training_mode_batchnorm_in_a_graph_is_refused():
    model = _seeded(ResidualFCN(width=2)).train()
    with pytest.raises(InvalidArgumentError, match=r"bn1 of stem\.1|bn1 of layer1 is in training mode|training"):
        to_dense(model, 1)
