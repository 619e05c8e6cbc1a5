"""``backend='gather'``: the hard-routed switched conv at the FLOPs of one dense conv, in PyTorch.

Why: with ``(index, gate)`` routing each output pixel uses one expert, so the dense reference
(all ``breadth`` experts, then a pick) wastes ``breadth - 1`` convolutions. Here, as in MoE
grouped GEMMs, output pixels are sorted by expert and cut into tiles of ``T`` rows that each
belong to one expert (the last tile of an expert is padded); each kernel row is then one
batched matmul over all tiles, each tile with its own expert's weights. Runs on any device
(the CPU path, and the GPU fallback when Triton is missing).

Layout: the input is padded once into NHWC rows ``(N*Hp*Wp, C)`` (plus zero rows that
padded tile rows point at); output pixel ``(n, ho, wo)`` reads, for tap ``(i, j)``, row
``n*Hp*Wp + (ho*sH + i*dH)*Wp + wo*sW + j*dW``. The ``kW`` taps of kernel row ``i`` are
rows ``j*dW`` apart, so one ``index_select`` on an overlapping strided view gathers a
``(kW*C)``-wide slab of every patch, and the work runs per kernel row (``kH`` steps).

Why tiles and not one matmul per expert: the op count per call no longer grows with the
breadth (about ``3 * kH`` large ops forward, ``~(7 + kW) * kH`` backward), which matters on a
CPU where each op is a parallel region (and a shared CPU makes each region costly).

Memory: no ``N*H*W x C*kH*kW`` im2col buffer, only ``(P, kW*C)`` / ``(P, out)``-sized
scratch buffers and per-tile weight copies; on CPU the scratch buffers are kept between calls
(``REUSE_BUFFERS``; about 130 MiB for N8 C64 64x64 3x3 fwd+bwd). Autograd (through
:mod:`._custom_ops`) saves only the inputs and the routing; the backward re-sorts and
re-gathers.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple, Sequence

import torch

from ._custom_ops import call_switched_op, define_switched_op, memory_format_of, output_dtype
from .switched import HARD_BACKENDS

#: Debug/test switch: fill outputs with NaN before writing them, so that unwritten elements show.
POISON = False

#: Keep the large CPU scratch buffers (gathered patches, per-tile weights, products) between
#: calls, per thread: a fresh multi-MiB buffer is page-faulted in on every call, a large share
#: of the time on the 2-vCPU VM measured. They are released by :func:`release_buffers`.
REUSE_BUFFERS = True

_workspace = threading.local()


def release_buffers() -> None:
    """Free this thread's cached scratch buffers (see ``REUSE_BUFFERS``)."""
    _workspace.store = {}


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised internal buffer, reused across calls on CPU. Never returned to callers."""
    if device.type != "cpu" or not REUSE_BUFFERS:
        return torch.empty(shape, dtype=dtype, device=device)
    store = getattr(_workspace, "store", None)
    if store is None:
        store = _workspace.store = {}
    numel = math.prod(shape)
    buf = store.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = store[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


class _Plan(NamedTuple):
    """Geometry, the tiles over expert-sorted pixels, and the index maps between layouts."""

    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    h_out: int
    w_out: int
    hp: int
    wp: int
    pad: tuple[int, int]
    dilation: tuple[int, int]
    tile: int  # T, rows per tile
    tiles: int  # number of tiles
    tile_expert: torch.Tensor  # (tiles,) expert of each tile
    row_pixel: torch.Tensor  # (tiles*T,) pixel id of each tile row; P for padding rows
    pixel_row: torch.Tensor  # (P,) tile row of each pixel
    base: torch.Tensor  # (tiles*T,) top-left padded-NHWC row of each tile row's patch
    zero_row: int  # first of the zero rows that padding tile rows read


def tile_rows(pixels: int, out_channels: int, breadth: int) -> int:
    """Rows per tile: balances padding waste (``~breadth*T/2`` rows) against per-tile weight
    copies (``~pixels/T`` of ``C x out``); a power of two in [16, 1024]."""
    best = math.sqrt(max(1, pixels) * out_channels / (2 * breadth))
    return int(min(1024, max(16, 2 ** math.floor(math.log2(max(best, 1.0))))))


def _plan(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, stride, padding, dilation) -> _Plan:
    n, c, h, w = x.shape
    breadth, out_ch, _, kh, kw = weight.shape
    _, h_out, w_out = index.shape
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    flat = index.reshape(-1)
    total = flat.numel()
    device = flat.device
    # Out-of-range indices would silently pick a wrong expert (or read out of bounds later).
    if total:
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= breadth:
            raise IndexError(f"routing index must lie in [0, {breadth}) (breadth), got values in [{lo}, {hi}]")
    tile = tile_rows(total, out_ch, breadth)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=breadth)
    tiles_per = (counts + tile - 1) // tile
    tiles = int(tiles_per.sum())  # the one host sync
    experts = torch.arange(breadth, device=device)
    tile_expert = torch.repeat_interleave(experts, tiles_per, output_size=tiles)
    seg_start = torch.cumsum(counts, 0) - counts
    first_tile = torch.cumsum(tiles_per, 0) - tiles_per
    tile_start = seg_start[tile_expert] + (torch.arange(tiles, device=device) - first_tile[tile_expert]) * tile
    sorted_pos = tile_start.unsqueeze(1) + torch.arange(tile, device=device)  # (tiles, T)
    valid = (sorted_pos < (seg_start + counts)[tile_expert].unsqueeze(1)).reshape(-1)
    sorted_pos = sorted_pos.reshape(-1).clamp_(max=max(total - 1, 0))
    row_pixel = torch.where(valid, order[sorted_pos] if total else sorted_pos, total)
    pixel_row = torch.empty(total, dtype=torch.int64, device=device)
    pixel_row[row_pixel[valid]] = torch.arange(tiles * tile, device=device)[valid]
    per_image = h_out * w_out
    img, rem = row_pixel // per_image, row_pixel % per_image
    zero_row = n * hp * wp
    base = img * (hp * wp) + (rem // w_out) * (stride[0] * wp) + (rem % w_out) * stride[1]
    base = torch.where(valid, base, zero_row)
    return _Plan(
        n, c, h, w, kh, kw, h_out, w_out, hp, wp, tuple(padding), tuple(dilation), tile, tiles, tile_expert,
        row_pixel, pixel_row, base, zero_row,
    )  # fmt: skip


def _padded_rows(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``x`` zero-padded as ``(N*Hp*Wp, C)`` NHWC rows, then zero rows for padding tile rows,
    returned as the overlapping view ``(R, kW, C)``: entry ``r`` is one kernel row of the
    patch whose top-left input row is ``r``."""
    ph, pw = plan.pad
    dh, dw = plan.dilation
    reach = (plan.kh - 1) * dh * plan.wp + (plan.kw - 1) * dw
    rows = _scratch("xrows", (plan.zero_row + reach + 1, plan.c), x.dtype, x.device).zero_()
    grid = rows[: plan.zero_row].view(plan.n, plan.hp, plan.wp, plan.c)
    grid[:, ph : ph + plan.h, pw : pw + plan.w].copy_(x.permute(0, 2, 3, 1))
    usable = rows.shape[0] - (plan.kw - 1) * dw
    return rows.as_strided((usable, plan.kw, plan.c), (plan.c, dw * plan.c, 1))


def _tile_weights(per_expert: torch.Tensor, plan: _Plan, buffer: torch.Tensor) -> torch.Tensor:
    """Each tile's expert's weight block: a copy into ``buffer``, or a free broadcast view
    when there is a single expert."""
    if per_expert.shape[0] == 1:
        return per_expert.expand(plan.tiles, *per_expert.shape[1:])
    return torch.index_select(per_expert, 0, plan.tile_expert, out=buffer)


def _low(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


# Scratch buffers are reused across kernel rows with ``out=`` (and across calls on CPU, see
# ``_scratch``): fresh multi-MiB allocations are page-faulted in on every use, which cost
# more than the gathers themselves.


def gather_forward(
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
    """``gate * (conv(x, weight[index]) + bias)``: per kernel row one gather of ``(kW*C)``-wide
    patch rows and one batched matmul over the expert tiles; fp32 accumulation for fp16/bf16."""
    plan = _plan(x, weight, index, stride, padding, dilation)
    breadth, out_ch = weight.shape[:2]
    total = index.numel()
    kwc = plan.kw * plan.c
    rows_out = plan.tiles * plan.tile
    acc_dtype = torch.float32 if _low(x.dtype) else x.dtype
    rows = _scratch("rows", (total, out_ch), acc_dtype, x.device)
    if POISON:
        rows.fill_(float("nan"))
    if plan.tiles:
        xview = _padded_rows(x, plan)
        wrow = weight.permute(0, 3, 4, 2, 1).reshape(breadth, plan.kh, kwc, out_ch)  # (b, kH, kW*C, out)
        patches = _scratch("patches", (rows_out, plan.kw, plan.c), x.dtype, x.device)
        w_tiles = _scratch("w_tiles", (plan.tiles, kwc, out_ch), x.dtype, x.device)
        acc = _scratch("acc", (plan.tiles, plan.tile, out_ch), acc_dtype, x.device)
        part = _scratch("part", (plan.tiles, plan.tile, out_ch), x.dtype, x.device) if acc_dtype != x.dtype else None
        for i in range(plan.kh):
            torch.index_select(xview, 0, plan.base + i * plan.dilation[0] * plan.wp, out=patches)
            w_i = _tile_weights(wrow[:, i], plan, w_tiles)
            p3 = patches.view(plan.tiles, plan.tile, kwc)
            if part is not None:
                torch.bmm(p3, w_i, out=part)
                acc.copy_(part) if i == 0 else acc.add_(part)
            elif i == 0:
                torch.bmm(p3, w_i, out=acc)
            else:
                acc.baddbmm_(p3, w_i)
        torch.index_select(acc.view(-1, out_ch), 0, plan.pixel_row, out=rows)
    if bias is not None:
        rows += bias
    gate_rows = gate.reshape(-1, 1)
    if torch.promote_types(rows.dtype, gate.dtype) == rows.dtype:
        rows.mul_(gate_rows)
    else:
        rows = rows * gate_rows
    y = torch.empty(
        (plan.n, out_ch, plan.h_out, plan.w_out),
        dtype=output_dtype(x, gate),
        device=x.device,
        memory_format=memory_format_of(x),
    )
    if POISON:
        y.fill_(float("nan"))
    return y.copy_(rows.view(plan.n, plan.h_out, plan.w_out, out_ch).permute(0, 3, 1, 2))  # never alias the scratch


def gather_backward(
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
    """Gradients of :func:`gather_forward` for ``x``, ``weight``, ``bias``, ``gate``.

    Kernel row by kernel row, like the forward. ``grad_gate = <g, conv + bias>`` per pixel
    is computed without re-running the forward matmul: ``<g, P W> = <g W^T, P>``, and
    ``g W^T`` is the patch gradient that ``grad_x`` needs anyway. ``grad_x`` is accumulated
    with one strided add per tap into the padded input (no scatter); per-tile weight
    gradients are summed per expert with ``index_add_`` (deterministic on CPU; on CUDA as
    deterministic as PyTorch's ``index_add_`` under ``torch.use_deterministic_algorithms``).
    """
    need_x, need_w, need_b, need_g = needs
    plan = _plan(x, weight, index, stride, padding, dilation)
    breadth, out_ch = weight.shape[:2]
    c, kh, kw = plan.c, plan.kh, plan.kw
    kwc = kw * c
    total = index.numel()
    rows_out = plan.tiles * plan.tile
    dtype = x.dtype
    acc_dtype = torch.float32 if _low(dtype) else dtype

    # grad_y as NHWC rows plus one zero row (that padding tile rows read)
    g_ext = _scratch("g_ext", (total + 1, out_ch), dtype, x.device)
    g_ext[:total].view(plan.n, plan.h_out, plan.w_out, out_ch).copy_(grad.permute(0, 2, 3, 1))
    g_ext[total].zero_()
    g_rows = g_ext[:total]
    gate_rows = gate.reshape(total, 1).to(dtype)
    if need_b:  # sum over pixels of gate * grad_y: one matrix-vector product, no temporary
        grad_b = (g_rows.t().to(acc_dtype) @ gate_rows.to(acc_dtype)).view(out_ch).to(weight.dtype)
    else:
        grad_b = weight.new_zeros(out_ch)
    grad_w = weight.new_zeros((kh, breadth, out_ch * kwc), dtype=acc_dtype) if need_w else None
    gx_pad = _scratch("gx_pad", (plan.n, plan.hp, plan.wp, c), acc_dtype, x.device).zero_() if need_x else None
    gg_acc = _scratch("gg_acc", (rows_out, kwc), acc_dtype, x.device) if need_g else None  # row 0 writes it

    if plan.tiles and (need_x or need_w or need_g):
        # tile layout of grad_y (unscaled: for grad_x / grad_gate) and of gate * grad_y (grad_w)
        g_tiles = _scratch("g_tiles", (plan.tiles, plan.tile, out_ch), dtype, x.device)
        torch.index_select(g_ext, 0, plan.row_pixel, out=g_tiles.view(-1, out_ch))
        if need_w:
            gate_ext = torch.cat([gate_rows, gate_rows.new_zeros(1, 1)])
            gate_tiles = gate_ext.index_select(0, plan.row_pixel).view(plan.tiles, plan.tile, 1)
            gs_tiles = _scratch("gs_tiles", (plan.tiles, plan.tile, out_ch), dtype, x.device)
            gs_tiles_t = torch.mul(g_tiles, gate_tiles, out=gs_tiles).transpose(1, 2)
            part_w = _scratch("part_w", (plan.tiles, out_ch, kwc), dtype, x.device)
        if need_w or need_g:
            xview = _padded_rows(x, plan)
            patches = _scratch("patches", (rows_out, kw, c), dtype, x.device)
        if need_x or need_g:
            wrow_t = weight.permute(0, 3, 1, 4, 2).reshape(breadth, kh, out_ch, kwc)  # (b, kH, out, kW*C)
            w_tiles = _scratch("w_tiles", (plan.tiles, out_ch, kwc), dtype, x.device)
            gp = _scratch("gp", (plan.tiles, plan.tile, kwc), dtype, x.device)
        if need_x:
            gp_nat = _scratch("gp_nat", (total, kwc), dtype, x.device)
            gate_nat = gate.to(acc_dtype).unsqueeze(-1)
        sh, sw = stride
        dh, dw = plan.dilation
        for i in range(kh):
            if need_w or need_g:
                torch.index_select(xview, 0, plan.base + i * dh * plan.wp, out=patches)
            p3 = patches.view(plan.tiles, plan.tile, kwc) if (need_w or need_g) else None
            if need_w:
                torch.bmm(gs_tiles_t, p3, out=part_w)
                grad_w[i].index_add_(0, plan.tile_expert, part_w.view(plan.tiles, -1).to(acc_dtype))
            if need_x or need_g:
                torch.bmm(g_tiles, _tile_weights(wrow_t[:, i], plan, w_tiles), out=gp)  # d loss / d patch row, before the gate
                if need_g:
                    if i == 0:
                        torch.mul(gp.view(rows_out, kwc), patches.view(rows_out, kwc), out=gg_acc)
                    else:
                        gg_acc.addcmul_(gp.view(rows_out, kwc), patches.view(rows_out, kwc))
                if need_x:
                    torch.index_select(gp.view(rows_out, kwc), 0, plan.pixel_row, out=gp_nat)
                    taps = gp_nat.view(plan.n, plan.h_out, plan.w_out, kw, c)
                    hi = i * dh
                    for j in range(kw):
                        wi = j * dw
                        target = gx_pad[
                            :, hi : hi + sh * (plan.h_out - 1) + 1 : sh, wi : wi + sw * (plan.w_out - 1) + 1 : sw
                        ]
                        target.addcmul_(taps[:, :, :, j], gate_nat)

    fmt = memory_format_of(x)
    if need_x:
        ph, pw = plan.pad
        gx = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
        gx.copy_(gx_pad[:, ph : ph + plan.h, pw : pw + plan.w].permute(0, 3, 1, 2))  # never alias the scratch
    else:
        gx = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt).zero_()
    if need_w:
        grad_w = grad_w.view(kh, breadth, out_ch, kw, c).permute(1, 2, 4, 0, 3)
        grad_w = grad_w.to(weight.dtype).contiguous()
    else:
        grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if need_g:
        if not plan.tiles:
            gg_acc.zero_()
        grad_gate = gg_acc.sum(-1).index_select(0, plan.pixel_row)
        if bias is not None:
            grad_gate += g_rows.to(acc_dtype) @ bias.to(acc_dtype)
        grad_gate = grad_gate.to(gate.dtype).view(gate.shape)
    else:
        grad_gate = torch.zeros(gate.shape, dtype=gate.dtype, device=gate.device)
    return gx, grad_w, grad_b, grad_gate


_gather_op = define_switched_op("gather", gather_forward, gather_backward)


def gather_switched_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing: tuple[torch.Tensor, torch.Tensor],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Hard-routed switched conv through the ``dynconv::switched_conv2d_gather`` custom op."""
    return call_switched_op(_gather_op, x, weight, bias, routing, stride, padding, dilation)


HARD_BACKENDS["gather"] = gather_switched_conv2d
