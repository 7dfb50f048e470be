"""Triton kernels of the anchor operations (Fast ScanNet, Lin et al. IEEE TMI 2019;
definition in DESIGN.md 2.1).

Per axis, output index p reads input positions start(p) + d*t, t = 0..K-1, with
start(p) = (p // d_a) * s_a + p % d_a. Axis tuples are (kernel, dilation, s_a, d_a).

Offsets that can pass 2**31 elements (an image of N*O*Ho*Wo outputs, C*H*W inputs) are
int64; the grids use axis 0 only (axes 1 and 2 stop at 65535 blocks). The launch
configuration of each kernel is chosen by ``pool_config`` / ``conv_config`` (blocks,
warps, constexprs), which tests/test_gpu_compile.py compiles for sm_80 and sm_90.
"""
import torch
import triton
import triton.language as tl

from . import on_device

# Blocks are large enough for tl.dot (>= 16) and few enough for the CPU interpreter.
POOL_BLOCK = 256
# BLOCK_K 16, not 32: at 32 the float64 and 3x3 float32 kernels spilled on sm_80 (128+ registers)
CONV_BLOCK_M, CONV_BLOCK_N, CONV_BLOCK_K = 32, 32, 16
NUM_WARPS = 4


def pool_config(dtype: torch.dtype, kernel_yx, average: bool) -> dict:
    """The constexprs and launch options anch_pool2d_triton uses for this call."""
    return dict(KY=kernel_yx[0], KX=kernel_yx[1], AVERAGE=bool(average), IS_F64=dtype == torch.float64,
                BLOCK=POOL_BLOCK, num_warps=NUM_WARPS)


def conv_config(dtype: torch.dtype, kernel_yx, has_bias: bool) -> dict:
    """The constexprs and launch options anch_conv2d_triton uses for this call."""
    return dict(KY=kernel_yx[0], KX=kernel_yx[1], HAS_BIAS=bool(has_bias), IS_F64=dtype == torch.float64,
                BLOCK_M=CONV_BLOCK_M, BLOCK_N=CONV_BLOCK_N, BLOCK_K=CONV_BLOCK_K, num_warps=NUM_WARPS)


@triton.jit
def _anchor_start(p, s_a, d_a):
    return (p // d_a) * s_a + p % d_a


@triton.jit
def _to_output(acc, out_ptr):
    """Cast the accumulator to the output dtype, rounding to nearest even.

    For bfloat16 the rounding is done on the float32 bits first (x + 0x7FFF + lsb, then
    clear the low half), so the cast itself is exact: Triton's CPU interpreter truncates
    in float32 -> bfloat16 casts where GPUs round to nearest even, and this way both give
    the rounding PyTorch uses.
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = acc.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        acc = tl.where(acc != acc, acc, rounded.to(tl.float32, bitcast=True))
    return acc.to(out_ptr.dtype.element_ty)


@triton.jit
def anch_pool2d_kernel(x_ptr, out_ptr, C, Ho, Wo, NBLK, sxn, sxc, sxh, sxw, DY, DX, SAY, SAX, DAY, DAX,
                       KY: tl.constexpr, KX: tl.constexpr, AVERAGE: tl.constexpr, IS_F64: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out[n, c, p, q] = max (or mean) over (ty, tx) of x[n, c, start_y(p) + DY*ty, start_x(q) + DX*tx].

    Grid: (N*C*NBLK,), NBLK = cdiv(Ho*Wo, BLOCK) blocks per plane. Accumulates in float32
    (float64 for float64 input); the max keeps the winning element, so it is exact in every
    dtype, and propagates NaN.
    """
    acc_t = tl.float64 if IS_F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    nc = pid // NBLK
    offs = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    p = offs // Wo
    q = offs % Wo
    mask = p < Ho  # offs < Ho*Wo without the int32 product Ho*Wo
    y0 = _anchor_start(p, SAY, DAY)
    x0 = _anchor_start(q, SAX, DAX)
    base = x_ptr + (nc // C) * sxn + (nc % C) * sxc
    if AVERAGE:
        acc = tl.zeros((BLOCK,), dtype=acc_t)
    else:
        acc = tl.load(base + y0 * sxh + x0 * sxw, mask=mask, other=0).to(acc_t)
    for ty in tl.static_range(KY):
        for tx in tl.static_range(KX):
            v = tl.load(base + (y0 + DY * ty) * sxh + (x0 + DX * tx) * sxw, mask=mask, other=0).to(acc_t)
            if AVERAGE:
                acc += v
            else:
                acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
    if AVERAGE:
        acc = acc / (KY * KX)
    tl.store(out_ptr + (nc * Ho * Wo + offs), _to_output(acc, out_ptr), mask=mask)


@triton.jit
def anch_conv2d_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, O, C, Ho, Wo, sxn, sxc, sxh, sxw, swo, swc, swy, swx,
                       DY, DX, SAY, SAX, DAY, DAX, KY: tl.constexpr, KX: tl.constexpr, HAS_BIAS: tl.constexpr,
                       IS_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Implicit GEMM: out[m, o] = bias[o] + sum_k A[m, k] * B[k, o] with m = (n, p, q),
    k = (c, ty, tx), A[m, k] = x[n, c, start_y(p) + DY*ty, start_x(q) + DX*tx] (the anchor
    index map) and B[k, o] = w[o, c, ty, tx].

    Operands are widened to float32 (float64 for float64 input) before tl.dot with IEEE
    precision: one code path that is exact enough for the tolerance of DESIGN.md 5 on a
    GPU and that Triton's CPU interpreter runs (its bfloat16 tl.dot multiplies raw bits,
    triton-lang/triton#11584). Grid: (cdiv(M, BLOCK_M), cdiv(O, BLOCK_N)).
    """
    acc_t = tl.float64 if IS_F64 else tl.float32
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < O
    q = rm % Wo
    p = (rm // Wo) % Ho
    img = (rm // Wo) // Ho
    y0 = _anchor_start(p, SAY, DAY)
    x0 = _anchor_start(q, SAX, DAX)
    a_row = img * sxn + y0 * sxh + x0 * sxw
    k_total = C * KY * KX
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    for k0 in range(0, k_total, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_total
        ch = rk // (KY * KX)
        t = rk % (KY * KX)
        ty = t // KX
        tx = t % KX
        a_col = ch.to(tl.int64) * sxc + ty * DY * sxh + tx * DX * sxw
        a = tl.load(x_ptr + a_row[:, None] + a_col[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        b_off = ch * swc + ty * swy + tx * swx
        b = tl.load(w_ptr + b_off[:, None] + rn[None, :] * swo, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(a.to(acc_t), b.to(acc_t), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0).to(acc_t)[None, :]
    # int64 throughout (img, rn, p, q are): O*Ho*Wo alone is computed in int32
    out_off = ((img[:, None] * O + rn[None, :]) * Ho + p[:, None]) * Wo + q[:, None]
    tl.store(out_ptr + out_off, _to_output(acc, out_ptr), mask=m_mask[:, None] & n_mask[None, :])


def anch_pool2d_triton(x: torch.Tensor, axis_y, axis_x, out_hw, average: bool) -> torch.Tensor:
    """AnchPool with Triton. x: (N, C, H, W), any strides. Returns (N, C, Ho, Wo), contiguous."""
    n, c = x.shape[:2]
    ho, wo = out_hw
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    ky, dy, say, day = axis_y
    kx, dx, sax, dax = axis_x
    cfg = pool_config(x.dtype, (ky, kx), average)
    nblk = triton.cdiv(ho * wo, cfg["BLOCK"])
    with on_device(x):
        anch_pool2d_kernel[(n * c * nblk,)](x, out, c, ho, wo, nblk, *x.stride(), dy, dx, say, sax, day, dax, **cfg)
    return out


def anch_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias, axis_y, axis_x, out_hw) -> torch.Tensor:
    """AnchConv with Triton. x: (N, C, H, W), weight: (O, C, Ky, Kx), any strides; bias (O,) or None."""
    n = x.shape[0]
    o = weight.shape[0]
    ho, wo = out_hw
    out = torch.empty((n, o, ho, wo), dtype=x.dtype, device=x.device)
    ky, dy, say, day = axis_y
    kx, dx, sax, dax = axis_x
    m = n * ho * wo
    cfg = conv_config(x.dtype, (ky, kx), bias is not None)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(o, cfg["BLOCK_N"]))  # axis 1: O / 32 blocks, far below 65535
    with on_device(x):
        anch_conv2d_kernel[grid](x, weight, out if bias is None else bias, out, m, o, x.shape[1], ho, wo,
                                 *x.stride(), *weight.stride(), dy, dx, say, sax, day, dax, **cfg)
    return out
