"""Reference anchor operations: DESIGN.md 2.1 transcribed literally (gather taps, reduce).

Per axis, output index p reads input positions
    start(p) = (p // d_a) * s_a + (p % d_a),   taps(p) = start(p) + d * t,  t = 0..K-1,
for p = 0, 1, ... up to the first p with start(p) + d*(K-1) > n-1 (for s_a >= d_a that
is every valid p; for s_a < d_a, where start is not monotonic, the longest valid prefix).
"""
import torch


def anchor_taps(n: int, kernel: int, dilation: int, anchor_stride: int, operating_distance: int) -> torch.Tensor:
    """Input positions read by each output index along one axis.

    Returns:
        LongTensor of shape (P, kernel): row p holds taps(p). P is the length of the longest
        prefix of p whose last tap is inside the input, found by enumeration (no closed form).
    """
    rows = []
    p = 0
    while True:
        start = (p // operating_distance) * anchor_stride + (p % operating_distance)
        if start + dilation * (kernel - 1) > n - 1:
            break
        rows.append([start + dilation * t for t in range(kernel)])
        p += 1
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), kernel)


def _gather(x: torch.Tensor, ay, ax) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, Ho, Wo, Ky, Kx): every tap of every output position."""
    iy = anchor_taps(x.shape[2], *ay).to(x.device)  # (Ho, Ky)
    ix = anchor_taps(x.shape[3], *ax).to(x.device)  # (Wo, Kx)
    return x[:, :, iy[:, None, :, None], ix[None, :, None, :]]


def anch_pool2d_ref(x: torch.Tensor, axis_y, axis_x, mode: str = "max") -> torch.Tensor:
    """Anchor pooling. axis_y / axis_x: (kernel, dilation, anchor_stride, operating_distance).

    Args:
        x: (N, C, H, W).
    Returns:
        (N, C, Ho, Wo): max (or mean) over the Ky*Kx taps of each output position.
    """
    taps = _gather(x, axis_y, axis_x)
    return taps.amax(dim=(-2, -1)) if mode == "max" else taps.mean(dim=(-2, -1))


def anch_conv2d_ref(x: torch.Tensor, weight: torch.Tensor, bias, axis_y, axis_x) -> torch.Tensor:
    """Anchor convolution: out[n,o,p,q] = bias[o] + sum_{c,ty,tx} w[o,c,ty,tx] * x[n,c,tap_y,tap_x].

    Args:
        x: (N, C, H, W); weight: (O, C, Ky, Kx); bias: (O,) or None.
    Returns:
        (N, O, Ho, Wo).
    """
    out = torch.einsum("ncpqyx,ocyx->nopq", _gather(x, axis_y, axis_x), weight)
    return out if bias is None else out + bias[None, :, None, None]
