"""Triton kernels for ``involution2d`` (forward, grad input, grad kernel).

Why: the unfold formulation materialises a ``K*K``-times larger patch tensor (and keeps
it for backward), which is both slow and the reason it runs out of memory at 224x224;
the official CuPy kernel is fp32-only. These kernels gather the ``K*K`` taps straight
from ``x`` (any strides: NCHW or channels_last), accumulate in fp32 and write the input
dtype, so peak memory is inputs + outputs only. Grad input is the gather-form transpose
(stride > 1 handled by divisibility masks); grad kernel reduces over each group's
channels per tap. Loop bounds are constexpr or plain integer arguments only (valid for
triton 3.6 and 3.9, compiled or interpreted).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._custom_ops import skipped
from .condconv_triton import SUPPORTED_DTYPES, Pair, _empty, _next_pow2, prefers_channels_last, tile_warps


@triton.jit
def _inv_fwd_kernel(
    x_ptr, k_ptr, y_ptr,
    H, W, HO, WO, C, CG,
    sxn, sxc, sxh, sxw,
    skn, skg, skt, skh, skw,
    syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < HO * WO
    oh = offs_p // WO
    ow = offs_p % WO
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    x_base = x_ptr + n.to(tl.int64) * sxn
    k_base = k_ptr + n.to(tl.int64) * skn + oh * skh + ow * skw
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            in_b = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(
                x_base + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                mask=in_b[:, None] & c_mask[None, :], other=0.0,
            ).to(tl.float32)
            t = kh * KW + kw
            if ONE_GROUP:
                # the whole channel tile lies in one group: one kernel value per pixel
                kt = tl.load(k_base + ((pid_c * BLOCK_C) // CG) * skg + t * skt, mask=p_mask, other=0.0)
                acc += xt * kt.to(tl.float32)[:, None]
            else:
                kt = tl.load(
                    k_base[:, None] + (offs_c // CG)[None, :] * skg + t * skt,
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0,
                )
                acc += xt * kt.to(tl.float32)
    y_off = n.to(tl.int64) * syn + offs_c[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _inv_bwd_input_kernel(
    dy_ptr, k_ptr, dx_ptr,
    H, W, HO, WO, C, CG,
    sdn, sdc, sdh, sdw,
    skn, skg, skt, skh, skw,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < H * W
    ih = offs_p // W
    iw = offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    dy_base = dy_ptr + n.to(tl.int64) * sdn
    k_base = k_ptr + n.to(tl.int64) * skn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            th = ih + PH - kh * DH
            tw = iw + PW - kw * DW
            th_c = tl.maximum(th, 0)
            tw_c = tl.maximum(tw, 0)
            oh = th_c // SH
            ow = tw_c // SW
            valid = p_mask & (th >= 0) & (tw >= 0) & (th_c % SH == 0) & (tw_c % SW == 0) & (oh < HO) & (ow < WO)
            dyt = tl.load(
                dy_base + (oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                mask=valid[:, None] & c_mask[None, :], other=0.0,
            ).to(tl.float32)
            t = kh * KW + kw
            if ONE_GROUP:
                kt = tl.load(
                    k_base + ((pid_c * BLOCK_C) // CG) * skg + t * skt + oh * skh + ow * skw, mask=valid, other=0.0
                )
                acc += dyt * kt.to(tl.float32)[:, None]
            else:
                kt = tl.load(
                    k_base + (oh * skh + ow * skw)[:, None] + (offs_c // CG)[None, :] * skg + t * skt,
                    mask=valid[:, None] & c_mask[None, :], other=0.0,
                )
                acc += dyt * kt.to(tl.float32)
    dx_off = n.to(tl.int64) * sxn + offs_c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _inv_bwd_kernel_kernel(
    x_ptr, dy_ptr, dk_ptr,
    H, W, HO, WO, G, CG,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    skn, skg, skt, skh, skw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n_p_tiles = tl.cdiv(HO * WO, BLOCK_P)
    pid_p = tl.program_id(0) % n_p_tiles
    pid_ng = tl.program_id(0) // n_p_tiles
    n = pid_ng // G
    g = pid_ng % G
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < HO * WO
    oh = offs_p // WO
    ow = offs_p % WO
    x_base = x_ptr + n.to(tl.int64) * sxn
    dy_base = dy_ptr + n.to(tl.int64) * sdn
    dk_base = dk_ptr + n.to(tl.int64) * skn + g * skg + oh * skh + ow * skw
    for kh in range(KH):
        for kw in range(KW):
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            in_b = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for c0 in range(0, CG, BLOCK_C):
                offs_c = g * CG + c0 + tl.arange(0, BLOCK_C)
                c_mask = (c0 + tl.arange(0, BLOCK_C)) < CG
                xt = tl.load(
                    x_base + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                    mask=in_b[:, None] & c_mask[None, :], other=0.0,
                ).to(tl.float32)
                dyt = tl.load(
                    dy_base + (oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0,
                ).to(tl.float32)
                acc += tl.sum(xt * dyt, axis=1)
            tl.store(dk_base + (kh * KW + kw) * skt, acc.to(dk_ptr.dtype.element_ty), mask=p_mask)


def _check(x: torch.Tensor, kernel: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"involution2d triton backend: x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if kernel.dtype != x.dtype:
        raise TypeError(f"involution2d triton backend: kernel dtype must match x ({x.dtype}), got {kernel.dtype}")
    if kernel.device != x.device:
        raise ValueError(f"involution2d triton backend: kernel must be on {x.device}, got {kernel.device}")


def _channel_blocks(c: int, cg: int, cap: int = 64) -> tuple[int, bool]:
    """Channel tile; when a tile can sit inside one group, one kernel value serves the whole row."""
    for block_c in (cap, 32, 16):
        if block_c <= cap and cg % block_c == 0:
            return block_c, True
    return min(cap, max(16, _next_pow2(c))), False


def involution2d_forward(
    x: torch.Tensor, kernel: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, groups: int
) -> torch.Tensor:
    """Forward pass; every geometry argument is an int pair."""
    _check(x, kernel)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho, wo = kernel.shape[3], kernel.shape[4]
    cg = c // groups
    y = _empty((n, c, ho, wo), x, channels_last=prefers_channels_last(x))
    if y.numel() == 0:
        return y
    block_p = min(64, max(16, _next_pow2(ho * wo)))
    block_c, one_group = _channel_blocks(c, cg)
    grid = (triton.cdiv(ho * wo, block_p), triton.cdiv(c, block_c), n)
    _inv_fwd_kernel[grid](
        x, kernel, y, h, w, ho, wo, c, cg,
        *x.stride(), *kernel.stride(), *y.stride(),
        sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, ONE_GROUP=one_group, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=tile_warps(block_p, block_c),
    )
    return y


def involution2d_backward(
    grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair,
    dilation: Pair, groups: int, need_input: bool = True, need_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_kernel)``; a skipped one is a fresh empty tensor."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho, wo = kernel.shape[3], kernel.shape[4]
    cg = c // groups
    grad = grad.to(x.dtype)
    grad_x, grad_k = skipped(x), skipped(x)
    if x.numel() == 0 or grad.numel() == 0:  # nothing to launch
        return (torch.zeros_like(x) if need_input else grad_x, torch.zeros_like(kernel) if need_kernel else grad_k)
    if need_input:
        grad_x = _empty(tuple(x.shape), x, channels_last=prefers_channels_last(x))
        block_p = min(64, max(16, _next_pow2(h * w)))
        block_c, one_group = _channel_blocks(c, cg)
        grid = (triton.cdiv(h * w, block_p), triton.cdiv(c, block_c), n)
        _inv_bwd_input_kernel[grid](
            grad, kernel, grad_x, h, w, ho, wo, c, cg,
            *grad.stride(), *kernel.stride(), *grad_x.stride(),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, ONE_GROUP=one_group, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=tile_warps(block_p, block_c),
        )
    if need_kernel:
        grad_k = _empty(tuple(kernel.shape), kernel)
        block_p = min(64, max(16, _next_pow2(ho * wo)))
        block_c = min(64, max(16, _next_pow2(cg)))
        grid = (triton.cdiv(ho * wo, block_p) * n * groups,)
        _inv_bwd_kernel_kernel[grid](
            x, grad, grad_k, h, w, ho, wo, groups, cg,
            *x.stride(), *grad.stride(), *grad_k.stride(),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=tile_warps(block_p, block_c),
        )
    return grad_x, grad_k
