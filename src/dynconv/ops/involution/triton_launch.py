"""Launches the Triton kernels of ``involution2d`` (forward, grad input, grad kernel), ``backend='triton'``.

Why: the unfold formulation materialises a ``K*K``-times larger patch tensor (and keeps
it for backward), which is both slow and the reason it runs out of memory at 224x224;
the official CuPy kernel is fp32-only. These kernels (:mod:`.triton_kernels`) gather the
``K*K`` taps straight from ``x`` (any strides: NCHW or channels_last), accumulate in fp32
and write the input dtype, so peak memory is inputs + outputs only. Grad input is the
gather-form transpose (stride > 1 handled by divisibility masks); grad kernel reduces over
each group's channels per tap.
"""

from __future__ import annotations

import torch
import triton

from ..custom_op import new_output, skipped
from ..triton_utils import block, check_operands, tile_warps
from .triton_kernels import inv_bwd_input_kernel, inv_bwd_kernel_kernel, inv_fwd_kernel

Pair = tuple[int, int]

#: Tile caps: pixels, and channels (each block its extent's next power of two, at least 16).
BLOCK_P_MAX = 64
BLOCK_C_MAX = 64


def _channel_blocks(c: int, cg: int, cap: int = BLOCK_C_MAX) -> tuple[int, bool]:
    """Channel tile; when a tile can sit inside one group, one kernel value serves the whole row."""
    for block_c in (cap, 32, 16):
        if block_c <= cap and cg % block_c == 0:
            return block_c, True
    return block(c, 16, cap), False


def _pixel_channel_tiles(pixels: int, c: int, cg: int, n: int) -> tuple[int, int, bool, tuple[int, int, int]]:
    """``(block_p, block_c, one_group, grid)`` of the forward and grad-input kernels, which
    walk ``pixels`` pixels x ``c`` channels of each of ``n`` examples."""
    block_p = block(pixels, 16, BLOCK_P_MAX)
    block_c, one_group = _channel_blocks(c, cg)
    return block_p, block_c, one_group, (triton.cdiv(pixels, block_p), triton.cdiv(c, block_c), n)


def forward(
    x: torch.Tensor, kernel: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, groups: int
) -> torch.Tensor:
    """Forward pass; every geometry argument is an int pair."""
    check_operands("involution2d", x, {"kernel": kernel}, {"kernel": kernel})
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho, wo = kernel.shape[3], kernel.shape[4]
    cg = c // groups
    y = new_output((n, c, ho, wo), x)
    if y.numel() == 0:
        return y
    block_p, block_c, one_group, grid = _pixel_channel_tiles(ho * wo, c, cg, n)
    inv_fwd_kernel[grid](
        x, kernel, y, h, w, ho, wo, c, cg,
        *x.stride(), *kernel.stride(), *y.stride(),
        sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, ONE_GROUP=one_group, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=tile_warps(block_p, block_c),
    )
    return y


def backward(
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
        grad_x = new_output(x.shape, x)
        block_p, block_c, one_group, grid = _pixel_channel_tiles(h * w, c, cg, n)
        inv_bwd_input_kernel[grid](
            grad, kernel, grad_x, h, w, ho, wo, c, cg,
            *grad.stride(), *kernel.stride(), *grad_x.stride(),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, ONE_GROUP=one_group, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=tile_warps(block_p, block_c),
        )
    if need_kernel:
        grad_k = new_output(kernel.shape, kernel, memory_format=torch.contiguous_format)
        block_p = block(ho * wo, 16, BLOCK_P_MAX)
        block_c = block(cg, 16, BLOCK_C_MAX)
        grid = (triton.cdiv(ho * wo, block_p) * n * groups,)
        inv_bwd_kernel_kernel[grid](
            x, grad, grad_k, h, w, ho, wo, groups, cg,
            *x.stride(), *grad.stride(), *grad_k.stride(),
            sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=tile_warps(block_p, block_c),
        )
    return grad_x, grad_k
