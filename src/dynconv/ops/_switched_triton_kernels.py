"""Triton kernels of ``backend='triton'`` (see :mod:`.switched_triton`) for the hard-routed switched conv.

Imported lazily, at the first launch: importing it imports triton and decorates the kernels,
which is when ``TRITON_INTERPRET`` is read.

Why: a hard-routed switched conv does the FLOPs of one dense conv whatever the breadth, but
only if each output pixel is multiplied by its own expert's weights without computing the
others. The kernels sort output pixels by expert (MoE-style grouped GEMM): every tile of
``BLOCK_M`` sorted pixels belongs to one expert, so a tile is a plain GEMM against that
expert's weights, with the input patches gathered on the fly from ``x`` (implicit GEMM: no
im2col buffer and no ``breadth`` outputs in global memory).

Kernels (fp32 accumulation; output in the input dtype):

* forward: ``y = gate * (patches @ W_e + bias)`` per tile;
* grad input (+ the gate's gradient): per tile and kernel tap ``(i, j)``,
  ``gp = grad_y @ W_e[:, :, i, j]`` (unscaled); ``grad_x += gate * gp`` at the tap's input
  pixels, and ``grad_gate += <gp, x patch>`` — that is ``<grad_y, conv(x, W_e)>`` without
  recomputing the conv; the ``<grad_y, bias>`` part is added in PyTorch;
* grad weight: per tile, ``grad_y^T @ patches`` into the tile's expert;
* grad bias: a PyTorch reduction of ``grad_y * gate``.

Determinism: by default grad input / grad weight / grad gate accumulate with fp32 atomics
(non-deterministic summation order). With ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) grad input runs one launch per kernel tap with
plain read-add-write (within one tap each input pixel gets at most one contribution), and
grad weight runs one program per (expert, out block, in block) looping over that expert's
tiles in order (one host sync for the longest expert).

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation. fp32 inputs use
TF32 dots when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default for
convolutions, so ``nn.Conv2d`` does the same), IEEE fp32 otherwise and always under the
CPU interpreter.

Compatibility: loops have constexpr or scalar-int bounds only (no bounds loaded from
tensors), so the kernels run on Triton 3.6+ compiled and under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ._backend import triton_usable_on
from ._custom_ops import memory_format_of, output_dtype

#: Debug/test switch: fill written-once outputs with NaN before the launch, so that elements a
#: kernel fails to write show up. Accumulation buffers start at zero and are not poisoned.
POISON = False

#: Tiles summed per program by the (atomic) weight-gradient kernel before its atomic flush.
TILES_PER_PROGRAM = 8

#: Validate routing indices (one device sync). Out-of-range indices leave pixels unwritten.
CHECK_INDEX = True


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


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
def _switched_fwd_kernel(
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
def _switched_bwd_input_kernel(
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
def _switched_bwd_weight_atomic_kernel(
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
def _switched_bwd_weight_det_kernel(
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


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


class _Tiles(NamedTuple):
    """Pixels sorted by expert and the ``BLOCK_M`` tiles over them (all on the device)."""

    order: torch.Tensor  # (P,) int32 pixel ids sorted by expert
    seg: torch.Tensor  # (breadth + 1,) int32 start of each expert's pixels in ``order``
    tile_e: torch.Tensor  # (T,) int32 expert of each tile, -1 for unused tiles
    tile_s: torch.Tensor  # (T,) int32 first sorted row of each tile
    tile_end: torch.Tensor  # (T,) int32 end of the tile's expert segment
    count: int  # T (on CUDA an upper bound on the tiles needed, to avoid a host sync)


def _make_tiles(index: torch.Tensor, breadth: int, block_m: int) -> _Tiles:
    flat = index.reshape(-1)
    total = flat.numel()
    if CHECK_INDEX and total:
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= breadth:
            raise IndexError(f"routing index must lie in [0, {breadth}) (breadth), got values in [{lo}, {hi}]")
    # the narrowest key that holds 0..breadth: radix sort passes scale with its width (on
    # CPU uint8 sorted ~5x faster than int64; unmeasured on GPU)
    key_dtype = torch.uint8 if breadth < 255 else torch.int16 if breadth < 2**15 - 1 else torch.int64
    sorted_idx, order = torch.sort(flat.to(key_dtype), stable=True)
    experts = torch.arange(breadth + 1, device=flat.device, dtype=key_dtype)
    seg = torch.searchsorted(sorted_idx, experts)  # (b+1,), no sync
    counts = seg[1:] - seg[:-1]
    tiles_per = (counts + block_m - 1) // block_m
    tile_end_cum = torch.cumsum(tiles_per, 0)
    tile_begin_cum = tile_end_cum - tiles_per
    if flat.is_cuda:  # an upper bound: no host sync; unused tiles exit at once
        count = max(1, (total + block_m - 1) // block_m + breadth)
    else:  # interpreter: syncing is free and every launched program costs Python time
        count = max(1, int(tiles_per.sum()))
    t = torch.arange(count, device=flat.device, dtype=tile_end_cum.dtype)
    e = torch.searchsorted(tile_end_cum, t, right=True)
    used = e < breadth
    ec = e.clamp(max=breadth - 1)
    tile_s = seg[ec] + (t - tile_begin_cum[ec]) * block_m
    tile_end = seg[ec + 1]
    tile_e = torch.where(used, ec, torch.full_like(ec, -1))
    i32 = torch.int32
    return _Tiles(order.to(i32), seg.to(i32), tile_e.to(i32), tile_s.to(i32), tile_end.to(i32), count)


def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and not x.is_cuda


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


class _Config(NamedTuple):
    block_m: int
    block_n: int  # forward: output channels
    block_k: int  # forward: input channels per step
    block_c: int  # backward: input channels
    block_o: int  # backward: output channels
    num_warps: int
    num_stages: int


def _gpu_config(c: int, out_ch: int) -> _Config:
    return _Config(64, _pow2(out_ch, 16, 128), _pow2(c, 16, 64), _pow2(c, 16, 64), _pow2(out_ch, 16, 64), 4, 3)


def _config(x: torch.Tensor, out_ch: int) -> _Config:
    c = x.shape[1]
    if not x.is_cuda:  # interpreter: small tiles keep numpy fast on tiny test shapes
        return _Config(32, _pow2(out_ch, 16, 32), _pow2(c, 16, 32), _pow2(c, 16, 32), _pow2(out_ch, 16, 32), 1, 1)
    return _gpu_config(c, out_ch)


def _check_device(x: torch.Tensor) -> None:
    if not triton_usable_on(x):
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            f"for CPU tensors); got a tensor on {x.device}"
        )


def _geometry(x, weight, index, stride, padding, dilation):
    n, c, h, w = x.shape
    _, h_out, w_out = index.shape
    return dict(
        C=c, H=h, W=w, O=weight.shape[1], HW_OUT=h_out * w_out, W_OUT=w_out,
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
    )


def triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    gate: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    deterministic: bool = False,
) -> torch.Tensor:
    """``gate * (conv(x, weight[index]) + bias)`` by the fused forward kernel (no autograd)."""
    _check_device(x)
    breadth, out_ch, _, kh, kw = weight.shape
    n, h_out, w_out = index.shape
    cfg = _config(x, out_ch)
    tiles = _make_tiles(index, breadth, cfg.block_m)
    y = torch.empty(
        (n, out_ch, h_out, w_out), dtype=output_dtype(x, gate), device=x.device, memory_format=memory_format_of(x)
    )
    if POISON:
        y.fill_(float("nan"))
    if y.numel() == 0:
        return y
    g = _geometry(x, weight, index, stride, padding, dilation)
    grid = (tiles.count, triton.cdiv(out_ch, cfg.block_n))
    _switched_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, gate, y,
        tiles.order, tiles.tile_e, tiles.tile_s, tiles.tile_end,
        *_geometry_args(g), *x.stride(), *weight.stride(), *gate.stride(), *y.stride(), *_conv_args(g),
        KH=kh, KW=kw, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=_precision(x), UPCAST=_upcast(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def _geometry_args(g: dict) -> tuple:
    return g["C"], g["H"], g["W"], g["O"], g["HW_OUT"], g["W_OUT"]


def _conv_args(g: dict) -> tuple:
    return g["STRIDE_H"], g["STRIDE_W"], g["PAD_H"], g["PAD_W"], g["DIL_H"], g["DIL_W"]


def triton_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    gate: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    deterministic: bool,
    needs: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``x``, ``weight``, ``bias``, ``gate`` (see the module docstring)."""
    _check_device(x)
    need_x, need_w, need_b, need_g = needs
    breadth, out_ch, c, kh, kw = weight.shape
    taps = kh * kw
    cfg = _config(x, out_ch)
    tiles = _make_tiles(index, breadth, cfg.block_m)
    g = _geometry(x, weight, index, stride, padding, dilation)
    precision = _precision(x)
    fmt = memory_format_of(x)
    gate_f = gate.float()
    grad_b = (
        (grad.float() * gate_f.unsqueeze(1)).sum((0, 2, 3)).to(weight.dtype)
        if need_b
        else weight.new_zeros(out_ch)
    )
    gx32 = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt).zero_()
    gg32 = torch.zeros(gate.shape, dtype=torch.float32, device=x.device)
    nonempty = grad.numel() > 0 and x.numel() > 0
    if (need_x or need_g) and nonempty:
        args = (
            grad, x, weight, gate, gx32, gg32, tiles.order, tiles.tile_e, tiles.tile_s, tiles.tile_end,
            *_geometry_args(g),
        )
        strides = (*grad.stride(), *x.stride(), *weight.stride(), *gate.stride(), *gx32.stride(), *_conv_args(g))
        meta = dict(
            KH=kh, KW=kw, NEED_X=bool(need_x), NEED_G=bool(need_g), BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
            BLOCK_O=cfg.block_o, PRECISION=precision, UPCAST=_upcast(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if deterministic:
            for tap in range(taps):
                _switched_bwd_input_kernel[(tiles.count, 1)](*args, tap, *strides, ATOMIC=False, **meta)
        else:
            _switched_bwd_input_kernel[(tiles.count, taps)](*args, 0, *strides, ATOMIC=True, **meta)
    if need_w:
        n_cb = triton.cdiv(c, cfg.block_c)
        common = (
            *_geometry_args(g), n_cb,
        )
        if deterministic:
            gw32 = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
            if POISON:
                gw32.fill_(float("nan"))
            counts = tiles.seg[1:] - tiles.seg[:-1]
            max_tiles = (int(counts.max()) + cfg.block_m - 1) // cfg.block_m if counts.numel() else 0
            grid = (breadth, triton.cdiv(out_ch, cfg.block_o), taps * n_cb)
            _switched_bwd_weight_det_kernel[grid](
                grad, x, gate, gw32, tiles.order, tiles.seg, *common, max_tiles,
                *grad.stride(), *x.stride(), *gate.stride(), *gw32.stride(), *_conv_args(g),
                KW=kw, BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o, BLOCK_C=cfg.block_c, PRECISION=precision, UPCAST=_upcast(x),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        else:
            gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            if nonempty:
                grid = (triton.cdiv(tiles.count, TILES_PER_PROGRAM), triton.cdiv(out_ch, cfg.block_o), taps * n_cb)
                _switched_bwd_weight_atomic_kernel[grid](
                    grad, x, gate, gw32, tiles.order, tiles.tile_e, tiles.tile_s, tiles.tile_end, *common,
                    tiles.count, *grad.stride(), *x.stride(), *gate.stride(), *gw32.stride(), *_conv_args(g),
                    KW=kw, TILES_PER_PROGRAM=TILES_PER_PROGRAM, BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o, BLOCK_C=cfg.block_c, PRECISION=precision, UPCAST=_upcast(x),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )  # fmt: skip
        grad_w = gw32.to(weight.dtype)
    else:
        grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if need_g and bias is not None:
        gg32 += torch.einsum("nohw,o->nhw", grad.float(), bias.float())
    gx = gx32.to(x.dtype)
    return gx, grad_w, grad_b, gg32.to(gate.dtype)
