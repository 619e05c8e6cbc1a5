"""Triton kernels of ``cond_conv2d`` (``backend='triton'``); launched by
:mod:`.triton_launch`, which describes the design.

Every kernel reads its inputs through their strides (NCHW, channels_last or any view) and
writes in the output's dtype. Loop bounds are constexpr or plain integer arguments only
(valid for triton 3.6 and 3.9, compiled or interpreted).
"""

import triton
import triton.language as tl


# --------------------------------------------------------------------------- general (GEMM) kernels


@triton.jit
def cc_fwd_kernel(
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
def cc_bwd_input_kernel(
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
def cc_bwd_weight_kernel(
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
def cc_dw_fwd_kernel(
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
def cc_dw_bwd_input_kernel(
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
def cc_dw_bwd_weight_kernel(
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
