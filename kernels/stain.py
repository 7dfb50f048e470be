"""Triton kernel of the fused H&E stain augmentation (Tellez et al. IEEE TMI 2018;
definition in DESIGN.md 3, per-pixel math as in csrc/include/hed.h).

uint8: out_j = rint(clip((T[0][j][r] * T[1][j][g]) * T[2][j][b], 0, 255)) with the
per-image tables T (N, 3, 3, 256) of pyfastscan.ops.stain.fused_params: the same products
in the same order as the C++ and CUDA kernels, so the same bits.
float32: out_j = min(exp(sum_i ln(max(P_i, 1e-6)) M_ij + k_j), 1).

The grid is one axis (axis 1 stops at 65535 blocks, 268 M pixels at 4096 a block).
``stain_config`` chooses the block: small on a GPU (the uint8 kernel gathers nine table
entries per pixel; at 4096 pixels a program it needed 255 registers and spilled), large
under the CPU interpreter, where each program is slow to start.
"""
import os

import torch
import triton
import triton.language as tl

from . import on_device

INTERPRET_BLOCK = 4096  # pixels per program under TRITON_INTERPRET=1
GPU_BLOCK = {True: 512, False: 1024}  # uint8, float32
NUM_WARPS = 4


def stain_config(is_u8: bool, interpret: bool = None) -> dict:
    """The constexprs and launch options hed_augment_triton uses (interpret: under
    TRITON_INTERPRET=1; default: as this process runs)."""
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block = INTERPRET_BLOCK if interpret else GPU_BLOCK[bool(is_u8)]
    return dict(IS_U8=bool(is_u8), BLOCK=block, num_warps=NUM_WARPS)


@triton.jit
def _u8_channel(t_ptr, j: tl.constexpr, r, g, b, mask):
    y = tl.load(t_ptr + (0 * 3 + j) * 256 + r, mask=mask, other=0.0)
    y = y * tl.load(t_ptr + (1 * 3 + j) * 256 + g, mask=mask, other=0.0)
    y = y * tl.load(t_ptr + (2 * 3 + j) * 256 + b, mask=mask, other=0.0)
    y = tl.minimum(tl.maximum(y, 0.0), 255.0)
    # round half to even without a rint intrinsic: floor(y + 0.5), minus 1 on exact ties
    # whose floor is odd (y is in [0, 255], so y + 0.5 is exact in float32)
    f = tl.floor(y + 0.5)
    tie = (f - y) == 0.5
    odd = (f.to(tl.int32) % 2) == 1
    return tl.where(tie & odd, f - 1.0, f).to(tl.uint8)


@triton.jit
def _float_channel(m_ptr, k_ptr, j: tl.constexpr, l0, l1, l2):
    e = l0 * tl.load(m_ptr + 0 * 3 + j) + l1 * tl.load(m_ptr + 1 * 3 + j) + l2 * tl.load(m_ptr + 2 * 3 + j)
    return tl.minimum(tl.exp(e + tl.load(k_ptr + j)), 1.0)


@triton.jit
def hed_augment_kernel(x_ptr, out_ptr, t_ptr, m_ptr, k_ptr, HW, NBLK, PIX_STRIDE, CH_STRIDE,
                       IS_U8: tl.constexpr, BLOCK: tl.constexpr):
    """Grid: (N*NBLK,), NBLK = cdiv(HW, BLOCK) blocks per image. Image i is contiguous,
    3*HW elements; channel c of pixel p is at p * PIX_STRIDE + c * CH_STRIDE (planar: 1, HW;
    interleaved: 3, 1)."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid // NBLK
    p = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    base = i * 3 * HW + p * PIX_STRIDE
    c0, c1, c2 = base, base + CH_STRIDE, base + 2 * CH_STRIDE
    if IS_U8:
        r = tl.load(x_ptr + c0, mask=mask, other=0).to(tl.int32)
        g = tl.load(x_ptr + c1, mask=mask, other=0).to(tl.int32)
        b = tl.load(x_ptr + c2, mask=mask, other=0).to(tl.int32)
        t = t_ptr + i * 9 * 256
        tl.store(out_ptr + c0, _u8_channel(t, 0, r, g, b, mask), mask=mask)
        tl.store(out_ptr + c1, _u8_channel(t, 1, r, g, b, mask), mask=mask)
        tl.store(out_ptr + c2, _u8_channel(t, 2, r, g, b, mask), mask=mask)
    else:
        l0 = tl.log(tl.maximum(tl.load(x_ptr + c0, mask=mask, other=1.0), 1e-6))
        l1 = tl.log(tl.maximum(tl.load(x_ptr + c1, mask=mask, other=1.0), 1e-6))
        l2 = tl.log(tl.maximum(tl.load(x_ptr + c2, mask=mask, other=1.0), 1e-6))
        m, k = m_ptr + i * 9, k_ptr + i * 3
        tl.store(out_ptr + c0, _float_channel(m, k, 0, l0, l1, l2), mask=mask)
        tl.store(out_ptr + c1, _float_channel(m, k, 1, l0, l1, l2), mask=mask)
        tl.store(out_ptr + c2, _float_channel(m, k, 2, l0, l1, l2), mask=mask)


def hed_augment_triton(x: torch.Tensor, out: torch.Tensor, params, channels_last: bool) -> None:
    """x, out: contiguous (N, 3, H, W) or (N, H, W, 3) uint8 / float32; params: FusedParams."""
    n, hw = x.shape[0], x[0].numel() // 3
    pix, ch = (3, 1) if channels_last else (1, hw)
    is_u8 = x.dtype == torch.uint8
    dev = x.device
    t = params.tables.to(dev) if is_u8 else torch.empty(1, device=dev)
    m = params.m.to(dev, torch.float32).contiguous()
    k = params.k.to(dev, torch.float32).contiguous()
    cfg = stain_config(is_u8)
    nblk = triton.cdiv(hw, cfg["BLOCK"])
    with on_device(x):
        hed_augment_kernel[(n * nblk,)](x, out, t, m, k, hw, nblk, pix, ch, **cfg)
