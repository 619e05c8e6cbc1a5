"""Launches the Triton kernels of ``cond_conv2d`` (CondConv / Dynamic Convolution), ``backend='triton'``.

Why: the grouped-conv trick (batch folded into conv groups) materialises ``N`` mixed
kernels and runs PyTorch's slow grouped-convolution path. Here each program mixes the
expert weights with the example's routing weights *on the fly*, tile by tile, and feeds
them to an implicit-GEMM convolution (``tl.dot``, fp32 accumulation); the mixed kernels
never reach global memory. For large feature maps (many pixel tiles per example, so the
on-the-fly mix would be redone many times) the kernels are instead mixed once by a GEMM
into an ``(N, kH, kW, in/g, out)`` buffer that the same conv kernel reads
(:data:`PREMIX_MIN_P_TILES`). Depthwise-like layers (``in_channels / groups == 1``) use a
direct (non-GEMM) kernel instead, since a GEMM with a reduction of ``kH*kW`` is wasted.

Backward: grad input is the transposed implicit GEMM with the same on-the-fly mixing;
grad expert weights and grad routing weights come from one kernel that forms each
example's kernel gradient ``G_n`` in registers and immediately contracts it with the
routing weights (``dW_e += a_ne G_n``) and with the experts (``da_ne += <G_n, W_e>``),
so ``G_n`` is never materialised either. Bias gradients are two tiny matmuls.
"""

from __future__ import annotations

import torch
import triton

from ..._checks import conv_output_size
from ..custom_op import new_output, skipped
from ..triton_utils import block, check_operands, dot_upcast, next_pow2, precision, tile_warps
from .triton_kernels import (
    cc_bwd_input_kernel,
    cc_bwd_weight_kernel,
    cc_dw_bwd_input_kernel,
    cc_dw_bwd_weight_kernel,
    cc_dw_fwd_kernel,
    cc_fwd_kernel,
)

Pair = tuple[int, int]

#: Mixing the experts on the fly costs E FMAs per weight element per pixel tile; with this
#: many pixel tiles per example, one GEMM that writes per-example kernels is cheaper.
PREMIX_MIN_P_TILES = 4

#: Tile caps of every kernel: each block is its extent's next power of two, at least 16 and
#: at most the cap. GEMM kernels: (pixels, input channels per group, output channels per
#: group); direct (depthwise) kernels: (pixels, channels).
GEMM_TILE_CAPS = {"forward": (128, 32, 64), "grad_input": (128, 64, 32), "grad_weight": (64, 32, 32)}
DIRECT_TILE_CAPS = (64, 64)


def _blocks(extents: tuple[int, ...], caps: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(block(v, 16, cap) for v, cap in zip(extents, caps))


#: The GEMM kernels run 8 warps from this many accumulator elements per program on, else 4.
GEMM_8_WARPS_FROM = {"forward": 8192, "grad_input": 8192, "grad_weight": 4096}


def _gemm_warps(kernel: str, accumulator_elements: int) -> int:
    return 8 if accumulator_elements >= GEMM_8_WARPS_FROM[kernel] else 4


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor) -> None:
    check_operands(
        "cond_conv2d", x, {"weight": weight, "bias": bias}, {"weight": weight, "routing_weights": routing, "bias": bias}
    )
    if not routing.is_floating_point():
        raise TypeError(f"cond_conv2d triton backend: routing_weights must be floating, got {routing.dtype}")


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[3], weight.shape[4]
    ho = conv_output_size(x.shape[2], kh, sh, ph, dh)
    wo = conv_output_size(x.shape[3], kw, sw, pw, dw)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"cond_conv2d: output size must be positive, got {(ho, wo)} for input {tuple(x.shape[2:])}")
    return kh, kw, ho, wo


def _expert_layout(weight: torch.Tensor) -> torch.Tensor:
    """``(E, out, in/g, kH, kW)`` -> ``(E, kH, kW, in/g, out)`` contiguous: output channels fastest."""
    return weight.permute(0, 3, 4, 2, 1).contiguous()


def _premix(wt: torch.Tensor, routing: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-example kernels ``(N, kH, kW, in/g, out)`` in ``dtype`` with one GEMM (fp32 accumulation)."""
    e = wt.shape[0]
    mixed = torch.matmul(routing.detach().to(wt.dtype), wt.reshape(e, -1))
    return mixed.view(routing.shape[0], *wt.shape[1:]).to(dtype)


def _n_per(n: int, tiles: int, target: int = 1024) -> int:
    """Examples per weight-gradient program: enough programs to fill the GPU, few atomics."""
    chunks = max(1, min(n, -(-target // max(1, tiles))))
    return next_pow2(-(-n // chunks))


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> torch.Tensor:
    """Forward pass; ``stride``/``padding``/``dilation`` are int pairs."""
    _check(x, weight, bias, routing)
    n, _, h, w = x.shape
    e, cout, cin_g = weight.shape[:3]
    kh, kw, ho, wo = _geometry(x, weight, stride, padding, dilation)
    cout_g = cout // groups
    wt = _expert_layout(weight)
    r = routing.detach().to(torch.float32).contiguous()
    b = bias.contiguous() if bias is not None else wt
    y = new_output((n, cout, ho, wo), x)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    p = ho * wo
    if y.numel() == 0:
        return y
    if cin_g == 1:
        block_p, block_c = _blocks((p, cout), DIRECT_TILE_CAPS)
        grid = (triton.cdiv(p, block_p), triton.cdiv(cout, block_c), n)
        cc_dw_fwd_kernel[grid](
            x, wt, b, r, y, h, w, ho, wo, cout, cout_g,
            *x.stride(), wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(4), *y.stride(),
            sh, sw, ph, pw, dh, dw,
            E=e, KH=kh, KW=kw, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=tile_warps(block_p, block_c),
        )
        return y
    block_p, block_ci, block_co = _blocks((p, cin_g, cout_g), GEMM_TILE_CAPS["forward"])
    premixed = triton.cdiv(p, block_p) >= PREMIX_MIN_P_TILES
    wk = _premix(wt, routing, x.dtype) if premixed else wt
    grid = (triton.cdiv(p, block_p) * n * groups, triton.cdiv(cout_g, block_co))
    cc_fwd_kernel[grid](
        x, wk, b, r, y, h, w, ho, wo, groups, cin_g, cout_g,
        *x.stride(), *wk.stride(), *y.stride(),
        sh, sw, ph, pw, dh, dw,
        E=e, KH=kh, KW=kw, HAS_BIAS=bias is not None, PREMIXED=premixed,
        BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci, PRECISION=precision(x), DOT_F32=dot_upcast(x),
        num_warps=_gemm_warps("forward", block_p * block_co),
    )
    return y


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int, need_input: bool = True, need_params: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_weight, grad_bias, grad_routing)``; skipped ones are fresh empty tensors."""
    n, cin, h, w = x.shape
    e, cout, cin_g = weight.shape[:3]
    kh, kw, ho, wo = _geometry(x, weight, stride, padding, dilation)
    cout_g = cout // groups
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    grad = grad.to(x.dtype)
    wt = _expert_layout(weight)
    r = routing.detach().to(torch.float32).contiguous()
    p = ho * wo
    grad_x = skipped(x)
    if x.numel() == 0 or grad.numel() == 0:  # nothing to launch: zero gradients of the right shapes
        zeros = (
            torch.zeros_like(x) if need_input else skipped(x),
            torch.zeros_like(weight) if need_params else skipped(x),
            torch.zeros_like(bias) if (need_params and bias is not None) else skipped(x),
            torch.zeros_like(routing) if need_params else skipped(x),
        )
        return zeros
    if need_input:
        grad_x = new_output(x.shape, x)
        if cin_g == 1:
            block_p, block_c = _blocks((h * w, cin), DIRECT_TILE_CAPS)
            grid = (triton.cdiv(h * w, block_p), triton.cdiv(cin, block_c), n)
            cc_dw_bwd_input_kernel[grid](
                grad, wt, r, grad_x, h, w, ho, wo, cin, cout_g,
                *grad.stride(), wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(4), *grad_x.stride(),
                sh, sw, ph, pw, dh, dw, E=e, KH=kh, KW=kw, BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=tile_warps(block_p, block_c),
            )
        else:
            block_p, block_ci, block_co = _blocks((h * w, cin_g, cout_g), GEMM_TILE_CAPS["grad_input"])
            premixed = triton.cdiv(h * w, block_p) >= PREMIX_MIN_P_TILES
            wk = _premix(wt, routing, x.dtype) if premixed else wt
            grid = (triton.cdiv(h * w, block_p) * n * groups, triton.cdiv(cin_g, block_ci))
            cc_bwd_input_kernel[grid](
                grad, wk, r, grad_x, h, w, ho, wo, groups, cin_g, cout_g,
                *grad.stride(), *wk.stride(), *grad_x.stride(),
                sh, sw, ph, pw, dh, dw, E=e, KH=kh, KW=kw, PREMIXED=premixed,
                BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=precision(x), DOT_F32=dot_upcast(x),
                num_warps=_gemm_warps("grad_input", block_p * block_ci),
            )
    if not need_params:
        return grad_x, skipped(x), skipped(x), skipped(x)
    dw_buf = torch.zeros(wt.shape, device=x.device, dtype=torch.float32)
    dr = torch.zeros((n, e), device=x.device, dtype=torch.float32)
    e_pad = max(2, next_pow2(e))
    if cin_g == 1:
        block_p, block_c = _blocks((p, cout), DIRECT_TILE_CAPS)
        tiles = triton.cdiv(cout, block_c) * kh * kw
        n_per = _n_per(n, tiles)
        grid = (triton.cdiv(cout, block_c), kh * kw, triton.cdiv(n, n_per))
        cc_dw_bwd_weight_kernel[grid](
            x, grad, wt, r, dw_buf, dr, n, h, w, ho, wo, cout, cout_g,
            *x.stride(), *grad.stride(), wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(4),
            sh, sw, ph, pw, dh, dw, E=e, E_PAD=e_pad, KH=kh, KW=kw, N_PER=n_per, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=tile_warps(block_p, block_c),
        )
    else:
        block_p, block_ci, block_co = _blocks((p, cin_g, cout_g), GEMM_TILE_CAPS["grad_weight"])
        n_ci = triton.cdiv(cin_g, block_ci)
        tiles = n_ci * triton.cdiv(cout_g, block_co) * kh * kw * groups
        n_per = _n_per(n, tiles)
        grid = (n_ci * triton.cdiv(cout_g, block_co), kh * kw, groups * triton.cdiv(n, n_per))
        cc_bwd_weight_kernel[grid](
            x, grad, wt, r, dw_buf, dr, n, h, w, ho, wo, groups, cin_g, cout_g, n_ci,
            *x.stride(), *grad.stride(), *wt.stride(),
            sh, sw, ph, pw, dh, dw, E=e, E_PAD=e_pad, KH=kh, KW=kw, N_PER=n_per,
            BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=precision(x), DOT_F32=dot_upcast(x),
            num_warps=_gemm_warps("grad_weight", e_pad * block_ci * block_co),
        )
    grad_w = dw_buf.permute(0, 4, 3, 1, 2).to(weight.dtype).contiguous()
    grad_b = skipped(x)
    if bias is not None:
        db_n = grad.sum(dim=(2, 3), dtype=torch.float32)  # (N, out)
        grad_b = (r.t() @ db_n).to(bias.dtype)
        dr += db_n @ bias.detach().to(torch.float32).t()
    return grad_x, grad_w, grad_b, dr.to(routing.dtype)
