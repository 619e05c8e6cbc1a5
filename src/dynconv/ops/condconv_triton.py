"""Fused Triton kernels for ``cond_conv2d`` (CondConv / Dynamic Convolution).

Why: the grouped-conv trick (batch folded into conv groups) materialises ``N`` mixed
kernels and runs PyTorch's slow grouped-convolution path. Here each program mixes the
expert weights with the example's routing weights *on the fly*, tile by tile, and feeds
them to an implicit-GEMM convolution (``tl.dot``, fp32 accumulation); the mixed kernels
never reach global memory. For large feature maps (many pixel tiles per example, so the
on-the-fly mix would be redone many times) the kernels are instead mixed once by a GEMM
into an ``(N, kH, kW, in/g, out)`` buffer that the same conv kernel reads
(``PREMIX_MIN_P_TILES``). Depthwise-like layers (``in_channels / groups == 1``) use a
direct (non-GEMM) kernel instead, since a GEMM with a reduction of ``kH*kW`` is wasted.

Backward: grad input is the transposed implicit GEMM with the same on-the-fly mixing;
grad expert weights and grad routing weights come from one kernel that forms each
example's kernel gradient ``G_n`` in registers and immediately contracts it with the
routing weights (``dW_e += a_ne G_n``) and with the experts (``da_ne += <G_n, W_e>``),
so ``G_n`` is never materialised either. Bias gradients are two tiny matmuls.

All kernels read inputs through their strides (NCHW, channels_last or any view) and
write outputs in the input dtype. Loop bounds are constexpr or plain integer
arguments only (valid for triton 3.6 and 3.9, compiled or interpreted).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._checks import conv_output_size
from ._custom_ops import memory_format_of, skipped

# Fill outputs with NaN before launch so tests catch elements a kernel fails to write.
POISON_OUTPUTS = os.environ.get("DYNCONV_POISON_OUTPUTS", "0") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Mixing the experts on the fly costs E FMAs per weight element per pixel tile; with this
# many pixel tiles per example, one GEMM that writes per-example kernels is cheaper.
PREMIX_MIN_P_TILES = 4
Pair = tuple[int, int]


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _empty(shape, like: torch.Tensor, dtype=None, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype, memory_format=fmt)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def prefers_channels_last(x: torch.Tensor) -> bool:
    """Outputs follow the input's layout: channels_last in, channels_last out."""
    return x.dim() == 4 and memory_format_of(x) == torch.channels_last


def tile_warps(block_p: int, block_c: int) -> int:
    """Warps for the element-wise (non-GEMM) kernels' ``block_p x block_c`` tiles: with 4
    warps, 64x64 tiles spill registers on sm_90 (the depthwise CondConv and involution
    kernels: 255 registers and up to 736 B of local memory per thread, per
    ``tests/aot_compile_launches.py --report``); 8 warps hold them without spilling."""
    return 8 if block_p * block_c >= 4096 else 4


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's conv default (TF32 allowed by cuDNN); the interpreter ignores it.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def _dot_f32(x: torch.Tensor) -> bool:
    """The CPU interpreter (triton 3.9) returns garbage for bf16 ``tl.dot``: upcast there only."""
    return (not x.is_cuda) and x.dtype == torch.bfloat16


# --------------------------------------------------------------------------- general (GEMM) kernels


@triton.jit
def _cc_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    H, W, HO, WO, G, CIN_G, COUT_G,
    sxn, sxc, sxh, sxw,
    swe, swh, sww, swi, swo,
    syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PREMIXED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    # (pixel tile, example*group) share axis 0: no 65535 limit on N*G, pixel tiles fastest
    n_p_tiles = tl.cdiv(HO * WO, BLOCK_P)
    pid_p = tl.program_id(0) % n_p_tiles
    pid_ng = tl.program_id(0) // n_p_tiles
    pid_co = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < HO * WO
    oh = offs_p // WO
    ow = offs_p % WO
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < COUT_G
    co = g * COUT_G + offs_co
    x_base = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            in_b = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_base + ih * sxh + iw * sxw
            for c0 in range(0, CIN_G, BLOCK_CI):
                offs_ci = c0 + tl.arange(0, BLOCK_CI)
                ci_mask = offs_ci < CIN_G
                xt = tl.load(
                    x_row[:, None] + (g * CIN_G + offs_ci)[None, :] * sxc,
                    mask=in_b[:, None] & ci_mask[None, :], other=0.0,
                )
                w_off = kh * swh + kw * sww + offs_ci[:, None] * swi + co[None, :] * swo
                w_mask = ci_mask[:, None] & co_mask[None, :]
                if PREMIXED:  # w holds per-example kernels: the "expert" index is the example
                    wt = tl.load(w_ptr + n.to(tl.int64) * swe + w_off, mask=w_mask, other=0.0).to(tl.float32)
                else:
                    wt = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
                    for e in range(E):
                        r = tl.load(r_ptr + n * E + e)
                        wt += r * tl.load(w_ptr + e * swe + w_off, mask=w_mask, other=0.0).to(tl.float32)
                if DOT_F32:
                    acc = tl.dot(xt.to(tl.float32), wt, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bm = tl.zeros((BLOCK_CO,), dtype=tl.float32)
        for e in range(E):
            r = tl.load(r_ptr + n * E + e)
            bm += r * tl.load(b_ptr + e * G * COUT_G + co, mask=co_mask, other=0.0).to(tl.float32)
        acc += bm[None, :]
    y_off = n.to(tl.int64) * syn + co[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])


@triton.jit
def _cc_bwd_input_kernel(
    dy_ptr, w_ptr, r_ptr, dx_ptr,
    H, W, HO, WO, G, CIN_G, COUT_G,
    sdn, sdc, sdh, sdw,
    swe, swh, sww, swi, swo,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PREMIXED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    n_p_tiles = tl.cdiv(H * W, BLOCK_P)
    pid_p = tl.program_id(0) % n_p_tiles
    pid_ng = tl.program_id(0) // n_p_tiles
    pid_ci = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < H * W
    ih = offs_p // W
    iw = offs_p % W
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < CIN_G
    dy_base = dy_ptr + n.to(tl.int64) * sdn
    acc = tl.zeros((BLOCK_P, BLOCK_CI), dtype=tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            th = ih + PH - kh * DH
            tw = iw + PW - kw * DW
            th_c = tl.maximum(th, 0)
            tw_c = tl.maximum(tw, 0)
            oh = th_c // SH
            ow = tw_c // SW
            valid = p_mask & (th >= 0) & (tw >= 0) & (th_c % SH == 0) & (tw_c % SW == 0) & (oh < HO) & (ow < WO)
            dy_row = dy_base + oh * sdh + ow * sdw
            for c0 in range(0, COUT_G, BLOCK_CO):
                offs_co = c0 + tl.arange(0, BLOCK_CO)
                co_mask = offs_co < COUT_G
                dyt = tl.load(
                    dy_row[:, None] + (g * COUT_G + offs_co)[None, :] * sdc,
                    mask=valid[:, None] & co_mask[None, :], other=0.0,
                )
                w_off = kh * swh + kw * sww + offs_ci[None, :] * swi + (g * COUT_G + offs_co)[:, None] * swo
                w_mask = co_mask[:, None] & ci_mask[None, :]
                if PREMIXED:
                    wt = tl.load(w_ptr + n.to(tl.int64) * swe + w_off, mask=w_mask, other=0.0).to(tl.float32)
                else:
                    wt = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
                    for e in range(E):
                        r = tl.load(r_ptr + n * E + e)
                        wt += r * tl.load(w_ptr + e * swe + w_off, mask=w_mask, other=0.0).to(tl.float32)
                if DOT_F32:
                    acc = tl.dot(dyt.to(tl.float32), wt, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(dyt, wt.to(dyt.dtype), acc, input_precision=PRECISION)
    dx_off = n.to(tl.int64) * sxn + (g * CIN_G + offs_ci)[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & ci_mask[None, :])


@triton.jit
def _cc_bwd_weight_kernel(
    x_ptr, dy_ptr, w_ptr, r_ptr, dw_ptr, dr_ptr,
    N, H, W, HO, WO, G, CIN_G, COUT_G, N_CI_TILES,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    swe, swh, sww, swi, swo,
    SH, SW, PH, PW, DH, DW,
    E: tl.constexpr, E_PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, N_PER: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_t = tl.program_id(0)
    tap = tl.program_id(1)
    pid_gn = tl.program_id(2)
    n_chunks = tl.cdiv(N, N_PER)
    g = pid_gn // n_chunks
    chunk = pid_gn % n_chunks
    pid_co = pid_t // N_CI_TILES
    pid_ci = pid_t % N_CI_TILES
    kh = tap // KW
    kw = tap % KW
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < CIN_G
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < COUT_G
    co = g * COUT_G + offs_co
    offs_e = tl.arange(0, E_PAD)
    e_mask = offs_e < E
    w3_off = (
        offs_e[:, None, None] * swe + kh * swh + kw * sww
        + offs_ci[None, :, None] * swi + co[None, None, :] * swo
    )
    w3_mask = e_mask[:, None, None] & ci_mask[None, :, None] & co_mask[None, None, :]
    acc = tl.zeros((E_PAD, BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for i in range(N_PER):
        n = chunk * N_PER + i
        p_lim = tl.where(n < N, HO * WO, 0)  # scalar-bool masks trip the interpreter
        e_lim = tl.where(n < N, E, 0)
        n_c = tl.minimum(n, N - 1)
        x_base = x_ptr + n_c.to(tl.int64) * sxn
        dy_base = dy_ptr + n_c.to(tl.int64) * sdn
        gw = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        for p0 in range(0, HO * WO, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < p_lim
            oh = offs_p // WO
            ow = offs_p % WO
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            in_b = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(
                x_base + (g * CIN_G + offs_ci)[:, None] * sxc + (ih * sxh + iw * sxw)[None, :],
                mask=ci_mask[:, None] & in_b[None, :], other=0.0,
            )
            dyt = tl.load(
                dy_base + (oh * sdh + ow * sdw)[:, None] + co[None, :] * sdc,
                mask=p_mask[:, None] & co_mask[None, :], other=0.0,
            )
            if DOT_F32:
                gw = tl.dot(xt.to(tl.float32), dyt.to(tl.float32), gw, input_precision=PRECISION)
            else:
                gw = tl.dot(xt, dyt, gw, input_precision=PRECISION)
        rv = tl.load(r_ptr + n_c * E + offs_e, mask=offs_e < e_lim, other=0.0)
        acc += rv[:, None, None] * gw[None, :, :]
        # experts re-read per example (L1/L2 hits) rather than held: keeps register pressure down
        w3 = tl.load(w_ptr + w3_off, mask=w3_mask, other=0.0).to(tl.float32)
        dr = tl.sum(tl.sum(w3 * gw[None, :, :], axis=2), axis=1)
        tl.atomic_add(dr_ptr + n_c * E + offs_e, dr, mask=offs_e < e_lim)
    tl.atomic_add(dw_ptr + w3_off, acc, mask=w3_mask)


# --------------------------------------------------------------------------- direct kernels (in/groups == 1)


@triton.jit
def _cc_dw_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    H, W, HO, WO, COUT, COUT_G,
    sxn, sxc, sxh, sxw,
    swe, swh, sww, swo,
    syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
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
    c_mask = offs_c < COUT
    cin = offs_c // COUT_G
    x_base = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            in_b = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(
                x_base + (ih * sxh + iw * sxw)[:, None] + cin[None, :] * sxc,
                mask=in_b[:, None] & c_mask[None, :], other=0.0,
            ).to(tl.float32)
            wm = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for e in range(E):
                r = tl.load(r_ptr + n * E + e)
                wm += r * tl.load(w_ptr + e * swe + kh * swh + kw * sww + offs_c * swo, mask=c_mask, other=0.0).to(tl.float32)
            acc += xt * wm[None, :]
    if HAS_BIAS:
        bm = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for e in range(E):
            r = tl.load(r_ptr + n * E + e)
            bm += r * tl.load(b_ptr + e * COUT + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        acc += bm[None, :]
    y_off = n.to(tl.int64) * syn + offs_c[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _cc_dw_bwd_input_kernel(
    dy_ptr, w_ptr, r_ptr, dx_ptr,
    H, W, HO, WO, CIN, COUT_G,
    sdn, sdc, sdh, sdw,
    swe, swh, sww, swo,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
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
    c_mask = offs_c < CIN
    dy_base = dy_ptr + n.to(tl.int64) * sdn
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
            for m in range(COUT_G):
                co = offs_c * COUT_G + m
                dyt = tl.load(
                    dy_base + (oh * sdh + ow * sdw)[:, None] + co[None, :] * sdc,
                    mask=valid[:, None] & c_mask[None, :], other=0.0,
                ).to(tl.float32)
                wm = tl.zeros((BLOCK_C,), dtype=tl.float32)
                for e in range(E):
                    r = tl.load(r_ptr + n * E + e)
                    wm += r * tl.load(w_ptr + e * swe + kh * swh + kw * sww + co * swo, mask=c_mask, other=0.0).to(tl.float32)
                acc += dyt * wm[None, :]
    dx_off = n.to(tl.int64) * sxn + offs_c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _cc_dw_bwd_weight_kernel(
    x_ptr, dy_ptr, w_ptr, r_ptr, dw_ptr, dr_ptr,
    N, H, W, HO, WO, COUT, COUT_G,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    swe, swh, sww, swo,
    SH, SW, PH, PW, DH, DW,
    E: tl.constexpr, E_PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, N_PER: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    tap = tl.program_id(1)
    chunk = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < COUT
    cin = offs_c // COUT_G
    offs_e = tl.arange(0, E_PAD)
    e_mask = offs_e < E
    w2_off = offs_e[:, None] * swe + kh * swh + kw * sww + offs_c[None, :] * swo
    w2_mask = e_mask[:, None] & c_mask[None, :]
    w2 = tl.load(w_ptr + w2_off, mask=w2_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((E_PAD, BLOCK_C), dtype=tl.float32)
    for i in range(N_PER):
        n = chunk * N_PER + i
        p_lim = tl.where(n < N, HO * WO, 0)  # scalar-bool masks trip the interpreter
        e_lim = tl.where(n < N, E, 0)
        n_c = tl.minimum(n, N - 1)
        x_base = x_ptr + n_c.to(tl.int64) * sxn
        dy_base = dy_ptr + n_c.to(tl.int64) * sdn
        gw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, HO * WO, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < p_lim
            oh = offs_p // WO
            ow = offs_p % WO
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            in_b = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(
                x_base + (ih * sxh + iw * sxw)[:, None] + cin[None, :] * sxc,
                mask=in_b[:, None] & c_mask[None, :], other=0.0,
            ).to(tl.float32)
            dyt = tl.load(
                dy_base + (oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                mask=p_mask[:, None] & c_mask[None, :], other=0.0,
            ).to(tl.float32)
            gw += tl.sum(xt * dyt, axis=0)
        rv = tl.load(r_ptr + n_c * E + offs_e, mask=offs_e < e_lim, other=0.0)
        acc += rv[:, None] * gw[None, :]
        dr = tl.sum(w2 * gw[None, :], axis=1)
        tl.atomic_add(dr_ptr + n_c * E + offs_e, dr, mask=offs_e < e_lim)
    tl.atomic_add(dw_ptr + w2_off, acc, mask=w2_mask)


# --------------------------------------------------------------------------- host wrappers


def _check_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cond_conv2d triton backend: x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"cond_conv2d triton backend: weight dtype must match x ({x.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"cond_conv2d triton backend: bias dtype must match x ({x.dtype}), got {bias.dtype}")
    if not routing.is_floating_point():
        raise TypeError(f"cond_conv2d triton backend: routing_weights must be floating, got {routing.dtype}")
    for name, t in (("weight", weight), ("routing_weights", routing), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"cond_conv2d triton backend: {name} must be on {x.device}, got {t.device}")


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


def _gemm_blocks(p: int, cin_g: int, cout_g: int) -> tuple[int, int, int]:
    block_p = 128 if p >= 128 else max(16, _next_pow2(p))
    block_co = min(64, max(16, _next_pow2(cout_g)))
    block_ci = min(32, max(16, _next_pow2(cin_g)))
    return block_p, block_co, block_ci


def _n_per(n: int, tiles: int, target: int = 1024) -> int:
    """Examples per weight-gradient program: enough programs to fill the GPU, few atomics."""
    chunks = max(1, min(n, -(-target // max(1, tiles))))
    return _next_pow2(-(-n // chunks))


def cond_conv2d_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> torch.Tensor:
    """Forward pass; ``stride``/``padding``/``dilation`` are int pairs."""
    _check_dtypes(x, weight, bias, routing)
    n, _, h, w = x.shape
    e, cout, cin_g = weight.shape[:3]
    kh, kw, ho, wo = _geometry(x, weight, stride, padding, dilation)
    cout_g = cout // groups
    wt = _expert_layout(weight)
    r = routing.detach().to(torch.float32).contiguous()
    b = bias.contiguous() if bias is not None else wt
    y = _empty((n, cout, ho, wo), x, channels_last=prefers_channels_last(x))
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    p = ho * wo
    if y.numel() == 0:
        return y
    if cin_g == 1:
        block_p = min(64, max(16, _next_pow2(p)))
        block_c = min(64, max(16, _next_pow2(cout)))
        grid = (triton.cdiv(p, block_p), triton.cdiv(cout, block_c), n)
        _cc_dw_fwd_kernel[grid](
            x, wt, b, r, y, h, w, ho, wo, cout, cout_g,
            *x.stride(), wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(4), *y.stride(),
            sh, sw, ph, pw, dh, dw,
            E=e, KH=kh, KW=kw, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=tile_warps(block_p, block_c),
        )
        return y
    block_p, block_co, block_ci = _gemm_blocks(p, cin_g, cout_g)
    premixed = triton.cdiv(p, block_p) >= PREMIX_MIN_P_TILES
    wk = _premix(wt, routing, x.dtype) if premixed else wt
    grid = (triton.cdiv(p, block_p) * n * groups, triton.cdiv(cout_g, block_co))
    _cc_fwd_kernel[grid](
        x, wk, b, r, y, h, w, ho, wo, groups, cin_g, cout_g,
        *x.stride(), *wk.stride(), *y.stride(),
        sh, sw, ph, pw, dh, dw,
        E=e, KH=kh, KW=kw, HAS_BIAS=bias is not None, PREMIXED=premixed,
        BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci, PRECISION=_precision(x.dtype), DOT_F32=_dot_f32(x),
        num_warps=8 if block_p * block_co >= 8192 else 4,
    )
    return y


def cond_conv2d_backward(
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
        grad_x = _empty(tuple(x.shape), x, channels_last=prefers_channels_last(x))
        if cin_g == 1:
            block_p = min(64, max(16, _next_pow2(h * w)))
            block_c = min(64, max(16, _next_pow2(cin)))
            grid = (triton.cdiv(h * w, block_p), triton.cdiv(cin, block_c), n)
            _cc_dw_bwd_input_kernel[grid](
                grad, wt, r, grad_x, h, w, ho, wo, cin, cout_g,
                *grad.stride(), wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(4), *grad_x.stride(),
                sh, sw, ph, pw, dh, dw, E=e, KH=kh, KW=kw, BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=tile_warps(block_p, block_c),
            )
        else:
            block_p, block_co, block_ci = _gemm_blocks(h * w, cin_g, cout_g)
            block_ci = min(64, max(16, _next_pow2(cin_g)))
            block_co = min(32, max(16, _next_pow2(cout_g)))
            premixed = triton.cdiv(h * w, block_p) >= PREMIX_MIN_P_TILES
            wk = _premix(wt, routing, x.dtype) if premixed else wt
            grid = (triton.cdiv(h * w, block_p) * n * groups, triton.cdiv(cin_g, block_ci))
            _cc_bwd_input_kernel[grid](
                grad, wk, r, grad_x, h, w, ho, wo, groups, cin_g, cout_g,
                *grad.stride(), *wk.stride(), *grad_x.stride(),
                sh, sw, ph, pw, dh, dw, E=e, KH=kh, KW=kw, PREMIXED=premixed,
                BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=_precision(x.dtype), DOT_F32=_dot_f32(x),
                num_warps=8 if block_p * block_ci >= 8192 else 4,
            )
    if not need_params:
        return grad_x, skipped(x), skipped(x), skipped(x)
    dw_buf = torch.zeros(wt.shape, device=x.device, dtype=torch.float32)
    dr = torch.zeros((n, e), device=x.device, dtype=torch.float32)
    e_pad = max(2, _next_pow2(e))
    if cin_g == 1:
        block_c = min(64, max(16, _next_pow2(cout)))
        block_p = min(64, max(16, _next_pow2(p)))
        tiles = triton.cdiv(cout, block_c) * kh * kw
        n_per = _n_per(n, tiles)
        grid = (triton.cdiv(cout, block_c), kh * kw, triton.cdiv(n, n_per))
        _cc_dw_bwd_weight_kernel[grid](
            x, grad, wt, r, dw_buf, dr, n, h, w, ho, wo, cout, cout_g,
            *x.stride(), *grad.stride(), wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(4),
            sh, sw, ph, pw, dh, dw, E=e, E_PAD=e_pad, KH=kh, KW=kw, N_PER=n_per, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=tile_warps(block_p, block_c),
        )
    else:
        block_ci = min(32, max(16, _next_pow2(cin_g)))
        block_co = min(32, max(16, _next_pow2(cout_g)))
        block_p = min(64, max(16, _next_pow2(p)))
        n_ci = triton.cdiv(cin_g, block_ci)
        tiles = n_ci * triton.cdiv(cout_g, block_co) * kh * kw * groups
        n_per = _n_per(n, tiles)
        grid = (n_ci * triton.cdiv(cout_g, block_co), kh * kw, groups * triton.cdiv(n, n_per))
        _cc_bwd_weight_kernel[grid](
            x, grad, wt, r, dw_buf, dr, n, h, w, ho, wo, groups, cin_g, cout_g, n_ci,
            *x.stride(), *grad.stride(), *wt.stride(),
            sh, sw, ph, pw, dh, dw, E=e, E_PAD=e_pad, KH=kh, KW=kw, N_PER=n_per,
            BLOCK_P=block_p, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=_precision(x.dtype), DOT_F32=_dot_f32(x),
            num_warps=8 if e_pad * block_ci * block_co >= 4096 else 4,
        )
    grad_w = dw_buf.permute(0, 4, 3, 1, 2).to(weight.dtype).contiguous()
    grad_b = skipped(x)
    if bias is not None:
        db_n = grad.sum(dim=(2, 3), dtype=torch.float32)  # (N, out)
        grad_b = (r.t() @ db_n).to(bias.dtype)
        dr += db_n @ bias.detach().to(torch.float32).t()
    return grad_x, grad_w, grad_b, dr.to(routing.dtype)
