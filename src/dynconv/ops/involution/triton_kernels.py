"""Triton kernels of ``involution2d`` (``backend='triton'``); launched by
:mod:`.triton_launch`, which describes the design.

Loop bounds are constexpr or plain integer arguments only (valid for triton 3.6 and 3.9,
compiled or interpreted).
"""

import triton
import triton.language as tl


@triton.jit
def inv_fwd_kernel(
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
def inv_bwd_input_kernel(
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
def inv_bwd_kernel_kernel(
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
