"""`pyfastscan demo`: a small dense scan of a random input, checked against a patch loop.

Interim demo of the foundation: it shows the anchor layers turning a small padding-free
patch classifier (random weights) into a scanner twice as dense as its stride, and checks
the dense-equals-patch-based invariant (DESIGN.md 2.2) on the spot. It is replaced by the
whole-slide demo when the scanning pipeline lands.
"""
import time

import torch
from torch import nn

from .backends import build_info, format_build_info
from .dense import to_dense
from .ops import last_backend


def run(map_side: int = 32) -> dict:
    torch.manual_seed(0)
    sparse = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3), nn.ReLU(),
                           nn.MaxPool2d(2), nn.Conv2d(16, 2, 3)).double()
    # Fast ScanNet schedule (DESIGN.md 2.3): the second pooling becomes the reconstruction
    # layer (AnchPool s_a = 2, d_a = alpha) and the last conv an AnchConv (s_a = d_a = alpha).
    dense = to_dense(sparse, alpha=2, plan="paper")
    g = dense.geometry
    patch, stride, alpha = g.patch, g.stride, g.alpha
    side = g.input_side(alpha * map_side)  # DESIGN.md 2.2, Eq. 1
    x = torch.rand(1, 3, side, side, dtype=torch.float64)
    with torch.no_grad():
        t0 = time.perf_counter()
        dense_map = dense(x)
        t_dense = time.perf_counter() - t0
        step = g.step
        n = dense_map.shape[-1]
        patches = torch.stack([x[0, :, i * step:i * step + patch, j * step:j * step + patch]
                               for i in range(n) for j in range(n)])
        t0 = time.perf_counter()
        loop_map = sparse(patches).reshape(n, n, 2).permute(2, 0, 1)[None]
        t_loop = time.perf_counter() - t0
    diff = (dense_map - loop_map).abs().max().item()
    return dict(patch=patch, stride=stride, alpha=alpha, input_side=side, map_shape=tuple(dense_map.shape),
                max_abs_diff=diff, t_dense=t_dense, t_patch_loop=t_loop, conv_backend=last_backend("anch_conv2d"),
                pool_backend=last_backend("anch_pool2d"))


def main() -> int:
    print(format_build_info(build_info()))
    print("\nDemo (interim, random weights; the whole-slide demo replaces it when the scan pipeline lands):")
    r = run()
    print(f"  patch classifier: patch {r['patch']} px, stride {r['stride']} px; dense factor alpha = {r['alpha']}")
    print(f"  input {r['input_side']} x {r['input_side']} px -> dense map {r['map_shape'][2]} x {r['map_shape'][3]} "
          f"(stride {r['stride'] // r['alpha']} px), anchor layers on backends pool={r['pool_backend']}, "
          f"conv={r['conv_backend']}")
    print(f"  dense scan {r['t_dense'] * 1e3:.1f} ms vs patch-by-patch {r['t_patch_loop'] * 1e3:.1f} ms "
          f"(float64, {r['map_shape'][2] * r['map_shape'][3]} patches)")
    # float64, three layers of at most 16*9 + 1 = 145-term sums of O(1) values: the
    # summation-order difference is bounded by about 3 * 145 * 2^-53 * max|activation|
    # (~1e-13 here); 1e-12 leaves room and still fails on any wrong tap (errors ~1e-2).
    ok = r["max_abs_diff"] <= 1e-12
    print(f"  dense map equals the patch-by-patch map: max |difference| = {r['max_abs_diff']:.2e} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
