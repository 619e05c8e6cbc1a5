"""Triton kernels of the hard-routed switched conv (``backend='triton'``); launched by
:mod:`.triton_launch`, which describes the design, precision and determinism.

Loops have constexpr or scalar-int bounds only (no bounds loaded from tensors), so the
kernels run on Triton 3.6+ compiled and under ``TRITON_INTERPRET=1``.
"""

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``; ``UPCAST`` works around Triton's CPU interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _pixel_coords(order_ptr, start, end, HW_OUT, W_OUT, BLOCK_M: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    pix = tl.load(order_ptr + rows, mask=row_mask, other=0)
    n = pix // HW_OUT
    rem = pix - n * HW_OUT
    ho = rem // W_OUT
    wo = rem - ho * W_OUT
    return pix, n.to(tl.int64), ho, wo, row_mask


@triton.jit
def switched_fwd_kernel(
    x_ptr, w_ptr, b_ptr, gate_ptr, y_ptr, order_ptr, tile_e_ptr, tile_s_ptr, tile_end_ptr,
    C, H, W, O, HW_OUT, W_OUT,
    sxn, sxc, sxh, sxw,
    swe, swo, swc, swh, sww,
    sgn, sgh, sgw,
    syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_t)
    if e < 0:
        return
    start = tl.load(tile_s_ptr + pid_t)
    end = tl.load(tile_end_ptr + pid_t)
    pix, n, ho, wo, row_mask = _pixel_coords(order_ptr, start, end, HW_OUT, W_OUT, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < O
    w_base = w_ptr + e.to(tl.int64) * swe
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KH * KW):
        i = tap // KW
        j = tap % KW
        hi = ho * STRIDE_H - PAD_H + i * DIL_H
        wi = wo * STRIDE_W - PAD_W + j * DIL_W
        valid = row_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_row = x_ptr + n * sxn + hi * sxh + wi * sxw
        w_tap = w_base + i * swh + j * sww
        for c0 in range(0, C, BLOCK_K):
            rk = c0 + tl.arange(0, BLOCK_K)
            k_mask = rk < C
            a = tl.load(x_row[:, None] + rk[None, :] * sxc, mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_tap + rn[None, :] * swo + rk[:, None] * swc, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    g = tl.load(gate_ptr + n * sgn + ho * sgh + wo * sgw, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * g[:, None]
    y_ptrs = y_ptr + (n * syn + ho * syh + wo * syw)[:, None] + rn[None, :] * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def switched_bwd_input_kernel(
    grad_ptr, x_ptr, w_ptr, gate_ptr, gx_ptr, gg_ptr, order_ptr, tile_e_ptr, tile_s_ptr, tile_end_ptr,
    C, H, W, O, HW_OUT, W_OUT, TAP_BASE,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    swe, swo, swc, swh, sww,
    sgn, sgh, sgw,
    son, soc, soh, sow,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ATOMIC: tl.constexpr, NEED_X: tl.constexpr, NEED_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    tap = TAP_BASE + tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_t)
    if e < 0:
        return
    start = tl.load(tile_s_ptr + pid_t)
    end = tl.load(tile_end_ptr + pid_t)
    pix, n, ho, wo, row_mask = _pixel_coords(order_ptr, start, end, HW_OUT, W_OUT, BLOCK_M)
    i = tap // KW
    j = tap % KW
    hi = ho * STRIDE_H - PAD_H + i * DIL_H
    wi = wo * STRIDE_W - PAD_W + j * DIL_W
    valid = row_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    gate = tl.load(gate_ptr + n * sgn + ho * sgh + wo * sgw, mask=row_mask, other=0.0).to(tl.float32)
    d_row = grad_ptr + n * sdn + ho * sdh + wo * sdw
    w_tap = w_ptr + e.to(tl.int64) * swe + i * swh + j * sww
    gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_mask = rc < C
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for o0 in range(0, O, BLOCK_O):
            ro = o0 + tl.arange(0, BLOCK_O)
            o_mask = ro < O
            d = tl.load(d_row[:, None] + ro[None, :] * sdc, mask=row_mask[:, None] & o_mask[None, :], other=0.0)
            wt = tl.load(w_tap + ro[:, None] * swo + rc[None, :] * swc, mask=o_mask[:, None] & c_mask[None, :], other=0.0)
            acc = _mma(d.to(wt.dtype), wt, acc, PRECISION, UPCAST)
        m2 = valid[:, None] & c_mask[None, :]
        if NEED_G:
            xa = tl.load(x_ptr + (n * sxn + hi * sxh + wi * sxw)[:, None] + rc[None, :] * sxc, mask=m2, other=0.0)
            gsum += tl.sum(acc * xa.to(tl.float32), axis=1)
        if NEED_X:
            val = acc * gate[:, None]
            o_ptrs = gx_ptr + (n * son + hi * soh + wi * sow)[:, None] + rc[None, :] * soc
            if ATOMIC:
                tl.atomic_add(o_ptrs, val, mask=m2)
            else:
                old = tl.load(o_ptrs, mask=m2, other=0.0)
                tl.store(o_ptrs, old + val, mask=m2)
    if NEED_G:
        if ATOMIC:
            tl.atomic_add(gg_ptr + pix, gsum, mask=row_mask)
        else:
            old_g = tl.load(gg_ptr + pix, mask=row_mask, other=0.0)
            tl.store(gg_ptr + pix, old_g + gsum, mask=row_mask)


@triton.jit
def _weight_tile_update(
    acc, grad_ptr, x_ptr, gate_ptr, order_ptr, start, end, ro, o_mask, rc, c_mask, i, j,
    C, H, W, O, HW_OUT, W_OUT,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, sgn, sgh, sgw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``acc += (gate * grad_y)[tile]^T @ x_patches[tile, tap (i, j), channel block]``."""
    pix, n, ho, wo, row_mask = _pixel_coords(order_ptr, start, end, HW_OUT, W_OUT, BLOCK_M)
    hi = ho * STRIDE_H - PAD_H + i * DIL_H
    wi = wo * STRIDE_W - PAD_W + j * DIL_W
    valid = row_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    gate = tl.load(gate_ptr + n * sgn + ho * sgh + wo * sgw, mask=row_mask, other=0.0).to(tl.float32)
    d = tl.load(
        grad_ptr + (n * sdn + ho * sdh + wo * sdw)[:, None] + ro[None, :] * sdc,
        mask=row_mask[:, None] & o_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    xa = tl.load(
        x_ptr + (n * sxn + hi * sxh + wi * sxw)[:, None] + rc[None, :] * sxc,
        mask=valid[:, None] & c_mask[None, :],
        other=0.0,
    )
    ds = (d * gate[:, None]).to(xa.dtype)
    return _mma(tl.trans(ds), xa, acc, PRECISION, UPCAST)


@triton.jit
def switched_bwd_weight_atomic_kernel(
    grad_ptr, x_ptr, gate_ptr, gw_ptr, order_ptr, tile_e_ptr, tile_s_ptr, tile_end_ptr,
    C, H, W, O, HW_OUT, W_OUT, N_CBLOCKS, N_TILES,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, sgn, sgh, sgw,
    swe, swo, swc, swh, sww,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KW: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Each program sums ``TILES_PER_PROGRAM`` consecutive tiles (sorted by expert) in registers
    and flushes with one atomic add per expert change: ~TILES_PER_PROGRAM x fewer atomics."""
    pid_g = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_k = tl.program_id(2)
    tap = pid_k // N_CBLOCKS
    cb = pid_k % N_CBLOCKS
    i = tap // KW
    j = tap % KW
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = ro < O
    rc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    out_offsets = ro[:, None] * swo + rc[None, :] * swc + i * swh + j * sww
    out_mask = o_mask[:, None] & c_mask[None, :]
    t0 = pid_g * TILES_PER_PROGRAM
    cur_e = tl.load(tile_e_ptr + t0)
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for k in range(TILES_PER_PROGRAM):
        t = t0 + k
        e = tl.load(tile_e_ptr + t, mask=t < N_TILES, other=-1)
        if e != cur_e:
            if cur_e >= 0:
                tl.atomic_add(gw_ptr + cur_e.to(tl.int64) * swe + out_offsets, acc, mask=out_mask)
            acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
            cur_e = e
        if e >= 0:
            start = tl.load(tile_s_ptr + t)
            end = tl.load(tile_end_ptr + t)
            acc = _weight_tile_update(
                acc, grad_ptr, x_ptr, gate_ptr, order_ptr, start, end, ro, o_mask, rc, c_mask, i, j,
                C, H, W, O, HW_OUT, W_OUT, sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, sgn, sgh, sgw,
                STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, BLOCK_M, PRECISION, UPCAST,
            )
    if cur_e >= 0:
        tl.atomic_add(gw_ptr + cur_e.to(tl.int64) * swe + out_offsets, acc, mask=out_mask)


@triton.jit
def switched_bwd_weight_det_kernel(
    grad_ptr, x_ptr, gate_ptr, gw_ptr, order_ptr, seg_ptr,
    C, H, W, O, HW_OUT, W_OUT, N_CBLOCKS, MAX_TILES,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, sgn, sgh, sgw,
    swe, swo, swc, swh, sww,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    e = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg_start = tl.load(seg_ptr + e)
    seg_end = tl.load(seg_ptr + e + 1)
    tap = pid_k // N_CBLOCKS
    cb = pid_k % N_CBLOCKS
    i = tap // KW
    j = tap % KW
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = ro < O
    rc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for t in range(0, MAX_TILES):  # scalar bound (host int); tiles past this expert's end are skipped
        start = seg_start + t * BLOCK_M
        if start < seg_end:
            acc = _weight_tile_update(
                acc, grad_ptr, x_ptr, gate_ptr, order_ptr, start, seg_end, ro, o_mask, rc, c_mask, i, j,
                C, H, W, O, HW_OUT, W_OUT, sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, sgn, sgh, sgw,
                STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, BLOCK_M, PRECISION, UPCAST,
            )
    ptrs = gw_ptr + e.to(tl.int64) * swe + ro[:, None] * swo + rc[None, :] * swc + i * swh + j * sww
    tl.store(ptrs, acc, mask=o_mask[:, None] & c_mask[None, :])
