"""``backend='gather'``: the hard-routed switched conv at the FLOPs of one dense conv, in PyTorch.

Why: with ``(index, gate)`` routing each output pixel uses one expert, so the dense reference
(all ``breadth`` experts, then a pick) wastes ``breadth - 1`` convolutions. Here, as in MoE
grouped GEMMs, output pixels are sorted by expert; each expert's run of pixels is a
contiguous segment of a patch matrix, and one matmul per expert with the whole patch as the
reduction (``K = kH*kW*C``) does its share of the conv. Runs on any device (the CPU path,
and the GPU path where Triton is missing).

Layout: the input is padded once into NHWC rows ``(N*Hp*Wp, C)``; output pixel
``(n, ho, wo)`` reads, for tap ``(i, j)``, row ``n*Hp*Wp + (ho*sH + i*dH)*Wp + wo*sW + j*dW``.
With ``dW == 1`` kernel row ``i`` of a patch is one contiguous ``kW*C`` run of those rows, so
a single ``index_select`` of ``rows * kH`` runs (its row-``memcpy`` path) gathers the
expert-sorted patch matrix ``(rows, K)``, columns in ``(i, j, c)`` order.

Expert-sorted pixels live in "slots" (:func:`_layout`): each expert owns a run of slots, its
pixels first; padding slots read an all-zero patch and a zero output gradient. Runs of
experts with similar pixel counts are padded to one length and batched into one ``bmm``
(at most :data:`BATCH_WASTE` padding; their weights are then a view, no copy), since every
matmul call is a parallel region with its own packing. Pixels are processed in chunks of at
most :data:`PATCH_BYTES` of patches, which stay cache-resident between their gather,
matmuls and fold and bound the scratch memory; an expert larger than a chunk is split.

Backward, per chunk: one patch gather serves ``grad_W_e^T = (gate*g)_e^T P_e``, then the
patch gradient ``(gate*g)_e W_e`` (into its own buffer), which one ``scatter_add_`` over
all taps folds into the padded input gradient (CPU: parallel over channels, every target
summed in row order, so deterministic), and the gate gradient: ``<g, P_e W_e^T + b> =
<(gate*g)_e W_e, P_e> / gate + <g, b>``, a row dot of the patch gradient with the patches
instead of a fourth matmul (pixels with a zero, tiny or non-finite gate are recomputed
directly, see :func:`_gate_grad_from_dot`).

Memory: on CPU the scratch buffers are kept between calls (:data:`REUSE_BUFFERS`; forward
and backward share them by name, a call never returns them): the patch chunk, the
backward's patch-gradient chunk, a few ``(slots, out)`` buffers, two padded NHWC
input-sized ones and two ``breadth`` x weight-size ones. The custom op saves only the
inputs and the routing; the backward re-sorts and re-gathers. Design history and
measurements: docs/performance.md.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple, Sequence

import torch

from ..custom_op import compute_dtype, memory_format_of, new_output, not_a_view, poison, skipped
from .functional import check_index_range, output_dtype, sort_key_dtype

#: Keep the large CPU scratch buffers (gathered patches, products) between calls, per
#: thread: a fresh multi-MiB buffer is page-faulted in on every call.
REUSE_BUFFERS = True

#: Upper bound on the gathered patch buffer (bytes); more pixels are processed in chunks.
PATCH_BYTES = 16 * 2**20

_workspace = threading.local()


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
        # a normal tensor even under torch.inference_mode: an inference tensor kept here could not
        # be written by a later call outside it (training after an inference-mode forward)
        with torch.inference_mode(False):
            buf = store[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


#: Experts whose pixel counts are similar are batched: ``g`` of them padded to the longest
#: one's count ``L`` run as one ``bmm`` (``(g, L, K) @ (g, K, out)``) instead of ``g`` matmuls
#: (each a parallel region with its own packing), while at most this share of the batch is
#: padding rows.
BATCH_WASTE = 1 / 8

#: A chunk holding one expert has a multiple of this many slots (padding slots at the end of
#: the expert's last piece) and its forward matmul runs as a ``bmm`` over this many row
#: blocks sharing the weight (its weight gradient over two, summed): faster than MKL's single
#: ``(rows, K) @ (K, out)`` with a narrow ``out`` (docs/performance.md).
ROW_BLOCKS = 4


class _Chunk(NamedTuple):
    """``g`` experts' slots ``[start, start + g*rows)``: expert ``experts[j]`` owns slots
    ``start + j*rows ...``, the first of them holding its pixels, the rest padding."""

    start: int
    experts: tuple[int, ...]
    rows: int  # L: slots per expert
    accumulate: bool  # a later piece of an expert split over chunks (weight grad adds up)


class _Plan(NamedTuple):
    """Geometry and the layout of expert-sorted pixels into slots (see :func:`_plan`)."""

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
    slots: int  # S
    slot_pixel: torch.Tensor  # (S,) pixel id of each slot; P for padding slots
    pixel_slot: torch.Tensor  # (P,) slot of each pixel
    base: torch.Tensor  # (S,) top-left padded-NHWC row of each slot's patch (an all-zero patch for padding)
    chunks: list[_Chunk]


def _layout(counts: list[int], max_rows: int) -> tuple[list[_Chunk], list[int], int]:
    """Chunks of at most ``max_rows`` slots (at least ``ROW_BLOCKS``) over the experts in order;
    returns the chunks, each expert's first slot, and the slot count. Experts with more pixels
    than a chunk are split; runs of experts with similar counts are padded to one length and
    batched (``BATCH_WASTE``); a chunk of one expert is padded to a multiple of ``ROW_BLOCKS``."""
    chunks: list[_Chunk] = []
    first = [0] * len(counts)
    slot = 0
    group: list[int] = []
    length = used = 0
    max_rows = max(ROW_BLOCKS, max_rows - max_rows % ROW_BLOCKS)

    def close():
        nonlocal slot, group, length, used
        if len(group) == 1:
            length = -(-length // ROW_BLOCKS) * ROW_BLOCKS
        if group:
            chunks.append(_Chunk(slot, tuple(group), length, False))
            for j, e in enumerate(group):
                first[e] = slot + j * length
            slot += len(group) * length
        group, length, used = [], 0, 0

    # expert ids stay in order (ordering them by count pads less but needs weight copies)
    for e, cnt in enumerate(counts):
        if not cnt:
            continue
        if cnt > max_rows:  # split: consecutive single-expert chunks, padding only in the last
            close()
            first[e] = slot
            for part in range(0, cnt, max_rows):
                rows = -(-min(max_rows, cnt - part) // ROW_BLOCKS) * ROW_BLOCKS
                chunks.append(_Chunk(slot, (e,), rows, part > 0))
                slot += rows
            continue
        new_len = max(length, cnt)
        size = (len(group) + 1) * new_len
        if group and (size > max_rows or size - (used + cnt) > size * BATCH_WASTE):
            close()
            new_len, size = cnt, cnt
        group.append(e)
        length, used = new_len, used + cnt
    close()
    return chunks, first, slot


def _plan(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, stride, padding, dilation, dtype) -> _Plan:
    """Pixels sorted by expert (stably) and laid out in slots: expert ``e``'s pixels fill the
    slots from ``first[e]`` on, so ``slot = sorted row + (first[e] - start of e's run)``."""
    n, c, h, w = x.shape
    breadth, out_ch, _, kh, kw = weight.shape
    _, h_out, w_out = index.shape
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    flat = index.reshape(-1)
    total = flat.numel()
    device = flat.device
    check_index_range(flat, breadth)
    key = flat.to(sort_key_dtype(breadth - 1))
    order = torch.argsort(key, stable=True)
    count_t = torch.bincount(flat, minlength=breadth)
    counts = count_t.tolist()  # host sync: the layout
    k = kh * kw * c
    max_rows = max(1, PATCH_BYTES // max(1, k * torch.empty((), dtype=dtype).element_size()))
    chunks, first, slots = _layout(counts, max_rows)
    run_start = [0] * breadth
    for e in range(1, breadth):
        run_start[e] = run_start[e - 1] + counts[e - 1]
    shift = torch.tensor([f - r for f, r in zip(first, run_start)], dtype=torch.int64, device=device)
    # sorted row -> slot; the sorted rows of expert e are a run of counts[e]
    slot_of_row = torch.arange(total, device=device).add_(shift.repeat_interleave(count_t, output_size=total))
    pixel_slot = torch.empty_like(order).index_copy_(0, order, slot_of_row)
    slot_pixel = torch.full((slots,), total, dtype=torch.int64, device=device).index_copy_(0, slot_of_row, order)
    base_pixel = torch.empty(total + 1, dtype=torch.int64, device=device)
    torch.add(  # (n, h_out, w_out) by broadcasting: cheaper than divisions of a pixel id
        torch.arange(n, device=device).view(n, 1, 1) * (hp * wp) + torch.arange(h_out, device=device).view(1, h_out, 1) * (stride[0] * wp),
        torch.arange(w_out, device=device).view(1, 1, w_out) * stride[1],
        out=base_pixel[:total].view(n, h_out, w_out),
    )
    base_pixel[total] = n * hp * wp  # the first zero tail row: an all-zero patch
    return _Plan(
        n, c, h, w, kh, kw, h_out, w_out, hp, wp, tuple(padding), tuple(dilation), slots, slot_pixel, pixel_slot,
        base_pixel[slot_pixel], chunks,
    )  # fmt: skip


def _padded_view(x: torch.Tensor, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """``x`` zero-padded as ``(N*Hp*Wp, C)`` NHWC rows (in ``dtype``) and zero tail rows,
    returned as the overlapping view ``(R, kH, kW, C)``: entry ``r`` is the patch whose
    top-left row is ``r`` (``r = N*Hp*Wp``: all zeros)."""
    ph, pw = plan.pad
    dh, dw = plan.dilation
    rows_n = plan.n * plan.hp * plan.wp
    rows = _scratch("xrows", (rows_n + _reach(plan) + 1, plan.c), dtype, x.device)
    grid = rows[:rows_n].view(plan.n, plan.hp, plan.wp, plan.c)
    # zero only what the copy leaves: the padding border and the tail rows
    rows[rows_n:].zero_()
    grid[:, :ph].zero_()
    grid[:, ph + plan.h :].zero_()
    grid[:, ph : ph + plan.h, :pw].zero_()
    grid[:, ph : ph + plan.h, pw + plan.w :].zero_()
    grid[:, ph : ph + plan.h, pw : pw + plan.w].copy_(x.permute(0, 2, 3, 1))
    c = plan.c
    return rows.as_strided((rows_n + 1, plan.kh, plan.kw, c), (c, dh * plan.wp * c, dw * c, 1))


def _reach(plan: _Plan) -> int:
    """Rows between a patch's first and last padded-NHWC row."""
    return (plan.kh - 1) * plan.dilation[0] * plan.wp + (plan.kw - 1) * plan.dilation[1]


def _consecutive(experts: tuple[int, ...]) -> bool:
    """Whether ``experts`` are ascending consecutive ids (then their weights are a slice)."""
    return experts == tuple(range(experts[0], experts[0] + len(experts)))


def _expert_batch(t: torch.Tensor, experts: tuple[int, ...]) -> torch.Tensor:
    """``t[experts]``: a view when the experts are consecutive, else a (small) copy."""
    if _consecutive(experts):
        return t[experts[0] : experts[-1] + 1]
    return t.index_select(0, torch.tensor(experts, device=t.device))


def _gather_patches(xview: torch.Tensor, base: torch.Tensor, out: torch.Tensor, plan: _Plan) -> None:
    """``out[r] = xview[base[r]]``. With ``dW == 1`` a kernel row of a patch is a contiguous
    ``kW*C`` run of the padded rows, so one ``index_select`` of ``rows * kH`` such runs (into
    the contiguous patch buffer) takes its row-``memcpy`` path, much faster than copying
    strided ``(kH, kW, C)`` slices."""
    if plan.dilation[1] != 1:
        torch.index_select(xview, 0, base, out=out)
        return
    step = plan.dilation[0] * plan.wp
    runs = xview.as_strided((xview.shape[0] + (plan.kh - 1) * step, plan.kw * plan.c), (plan.c, 1))
    offsets = torch.arange(plan.kh, device=base.device) * step
    torch.index_select(runs, 0, (base.unsqueeze(1) + offsets).view(-1), out=out.view(-1, plan.kw * plan.c))


def _flat_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(breadth, out, kH*kW*C)`` with columns in the patch's ``(i, j, c)`` order: a small
    copy that only swaps ``C`` and the taps (``W_e`` is used as the transposed view
    ``[e].t()``; a 5-D permute to ``(K, out)`` is several times slower)."""
    b, o, c, kh, kw = weight.shape
    out = _scratch("w_flat", (b * o, kh * kw, c), dtype, weight.device)
    # as a batch of (C, kH*kW) -> (kH*kW, C) transposes: faster than the 5-D permute copy
    out.copy_(weight.reshape(b * o, c, kh * kw).mT)
    return out.view(b, o, kh * kw * c)


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, gate: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], deterministic: bool = False,
) -> torch.Tensor:
    """``gate * (conv(x, weight[index]) + bias)``: one patch gather and one matmul per expert
    (``addmm`` with the bias) over expert-sorted pixels; fp32 compute for fp16/bf16."""
    cd = compute_dtype(x.dtype)
    plan = _plan(x, weight, index, stride, padding, dilation, cd)
    out_ch = weight.shape[1]
    total = index.numel()
    k = plan.kh * plan.kw * plan.c
    y_slots = poison(_scratch("rows_a", (plan.slots, out_ch), cd, x.device))
    if plan.chunks:
        xview = _padded_view(x, plan, cd)
        w_flat = _flat_weight(weight, cd)
        b_cd = bias.to(cd) if bias is not None else None
        for ch in plan.chunks:
            g, rows = len(ch.experts), ch.rows
            end = ch.start + g * rows
            patches = _scratch("patches", (g * rows, plan.kh, plan.kw, plan.c), cd, x.device)
            _gather_patches(xview, plan.base[ch.start : end], patches, plan)
            pm = patches.view(g * rows, k)
            out = y_slots[ch.start : end]
            if g == 1:  # as ROW_BLOCKS row blocks sharing the weight (see ROW_BLOCKS)
                blocks = (ROW_BLOCKS, rows // ROW_BLOCKS)
                w_e = w_flat[ch.experts[0]].t().expand(ROW_BLOCKS, k, out_ch)
                p3, out3 = pm.view(*blocks, k), out.view(*blocks, out_ch)
                if b_cd is None:
                    torch.bmm(p3, w_e, out=out3)
                else:
                    torch.baddbmm(b_cd.view(1, 1, out_ch), p3, w_e, out=out3)
            else:
                w_g = _expert_batch(w_flat, ch.experts).transpose(1, 2)
                out = out.view(g, rows, out_ch)
                if b_cd is None:
                    torch.bmm(pm.view(g, rows, k), w_g, out=out)
                else:
                    torch.baddbmm(b_cd.view(1, 1, out_ch), pm.view(g, rows, k), w_g, out=out)
    y_nat = _scratch("rows_b", (total, out_ch), cd, x.device)
    torch.index_select(y_slots, 0, plan.pixel_slot, out=y_nat)
    y = new_output((plan.n, out_ch, plan.h_out, plan.w_out), x, dtype=output_dtype(x, gate))
    # gate and layout in one pass; never alias the scratch
    if y.is_contiguous():  # as a batch of (pixels, out) -> (out, pixels) transposes: faster than 4-D
        hw = plan.h_out * plan.w_out
        torch.mul(y_nat.view(plan.n, hw, out_ch).mT, gate.reshape(plan.n, 1, hw), out=y.view(plan.n, out_ch, hw))
        return y
    return torch.mul(y_nat.view(plan.n, plan.h_out, plan.w_out, out_ch).permute(0, 3, 1, 2), gate.unsqueeze(1), out=y)


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
    gate: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], deterministic: bool,
    needs: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` for ``x``, ``weight``, ``bias``, ``gate``.

    Per chunk of expert-sorted rows: one patch gather, then per expert ``grad_W_e^T =
    (gate*g)_e^T P_e`` and the patch gradient ``(gate*g)_e W_e`` (its own buffer); one
    ``scatter_add_`` (CPU; deterministic) or ``index_add_`` (other devices) folds every tap of
    the patch gradient into the padded input gradient (off the CPU with ``deterministic``, tap
    by tap without atomics: :func:`_fold_tapwise`), and its row dot with the patches gives the
    gate gradient (:func:`_gate_grad_from_dot`). When ``x`` needs no gradient, the pre-gate
    output ``P_e W_e^T + b`` is recomputed for ``grad_gate = <g, .>`` instead.
    """
    need_x, need_w, need_b, need_g = needs
    dtype = x.dtype
    cd = compute_dtype(dtype)
    plan = _plan(x, weight, index, stride, padding, dilation, cd)
    breadth, out_ch = weight.shape[:2]
    c, kh, kw = plan.c, plan.kh, plan.kw
    k = kh * kw * c
    total = index.numel()
    dev = x.device

    # gate * grad_y as NHWC rows (gate and layout in one pass; plus a zero row that padding
    # slots read), then in slot order
    gs_nat = _scratch("rows_a", (total + 1, out_ch), cd, dev)
    if grad.is_contiguous():
        hw = plan.h_out * plan.w_out
        gate_col = gate.reshape(plan.n, hw, 1).to(cd)  # an fp32 gate: the product is computed in fp32
        torch.mul(grad.view(plan.n, out_ch, hw).mT, gate_col, out=gs_nat[:total].view(plan.n, hw, out_ch))
    else:
        gs_grid = gs_nat[:total].view(plan.n, plan.h_out, plan.w_out, out_ch)
        torch.mul(grad.permute(0, 2, 3, 1), gate.unsqueeze(-1).to(cd), out=gs_grid)
    gs_nat[total].zero_()
    gs = _scratch("rows_c", (plan.slots, out_ch), cd, dev)
    torch.index_select(gs_nat, 0, plan.slot_pixel, out=gs)

    grad_b = gs.sum(0).to(weight.dtype) if need_b else skipped(x)
    gw = _scratch("gw", (breadth, out_ch, k), cd, dev) if need_w else None  # grad_W^T per expert
    # The gate gradient <g, P W^T + b>: with the patch gradient (gate*g) W at hand it is
    # <(gate*g) W, P> / gate + <g, b> (a row dot instead of a fourth matmul); without it (x
    # needs no gradient) the pre-gate output P W^T + b is recomputed per slot.
    dot_gate = need_g and need_x
    pre = _scratch("rows_d", (plan.slots, out_ch), cd, dev) if (need_g and not dot_gate) else None
    pg_dot = _scratch("rows_e", (plan.slots,), cd, dev) if dot_gate else None  # <(gate*g) W, P> per slot
    if need_x:
        rows_n = plan.n * plan.hp * plan.wp
        gx_rows = _scratch("gx_rows", (rows_n + _reach(plan) + 1, c), cd, dev).zero_()
        dh, dw = plan.dilation
        taps = torch.tensor(
            [i * dh * plan.wp + j * dw for i in range(kh) for j in range(kw)], dtype=torch.int64, device=dev
        )
        fold_tapwise = deterministic and dev.type != "cpu"

    if plan.chunks and (need_x or need_w or need_g):
        xview = _padded_view(x, plan, cd)
        w_flat = _flat_weight(weight, cd)
        b_cd = bias.to(cd) if (need_g and bias is not None) else None
        for ch in plan.chunks:
            g, rows = len(ch.experts), ch.rows
            end = ch.start + g * rows
            patches = _scratch("patches", (g * rows, kh, kw, c), cd, dev)
            _gather_patches(xview, plan.base[ch.start : end], patches, plan)
            pm = patches.view(g * rows, k)
            gs_c = gs[ch.start : end]
            pgm = _scratch("patch_grad", (g * rows, k), cd, dev) if need_x else None
            if g == 1:
                e = ch.experts[0]
                if need_w:  # (gate*g)^T P over two row blocks, summed in a fixed order
                    half = rows // 2
                    parts = _scratch("gw_parts", (2, out_ch, k), cd, dev)
                    torch.bmm(gs_c.view(2, half, out_ch).transpose(1, 2), pm.view(2, half, k), out=parts)
                    if ch.accumulate:  # a later piece of a split expert
                        gw[e].add_(parts[0]).add_(parts[1])
                    else:
                        torch.add(parts[0], parts[1], out=gw[e])
                if pre is not None:
                    if b_cd is None:
                        torch.mm(pm, w_flat[e].t(), out=pre[ch.start : end])
                    else:
                        torch.addmm(b_cd, pm, w_flat[e].t(), out=pre[ch.start : end])
                if need_x:
                    torch.mm(gs_c, w_flat[e], out=pgm)
            else:
                p3, gs3 = pm.view(g, rows, k), gs_c.view(g, rows, out_ch)
                w_g = _expert_batch(w_flat, ch.experts)
                if need_w:
                    if _consecutive(ch.experts):
                        torch.bmm(gs3.transpose(1, 2), p3, out=gw[ch.experts[0] : ch.experts[-1] + 1])
                    else:
                        gw.index_copy_(0, torch.tensor(ch.experts, device=dev), torch.bmm(gs3.transpose(1, 2), p3))
                if pre is not None:
                    pre3 = pre[ch.start : end].view(g, rows, out_ch)
                    if b_cd is None:
                        torch.bmm(p3, w_g.transpose(1, 2), out=pre3)
                    else:
                        torch.baddbmm(b_cd.view(1, 1, out_ch), p3, w_g.transpose(1, 2), out=pre3)
                if need_x:
                    torch.bmm(gs3, w_g, out=pgm.view(g, rows, k))
            if need_x:  # padding slots carry zero gradients into the (unread) zero tail rows
                base_c = plan.base[ch.start : end]
                if fold_tapwise:
                    _fold_tapwise(gx_rows, pgm, base_c, taps)
                else:
                    fold_index = (base_c.unsqueeze(1) + taps).view(-1, 1)
                    if dev.type == "cpu":  # parallel over channels, each target summed in row order
                        gx_rows.scatter_add_(0, fold_index.expand(-1, c), pgm.view(-1, c))
                    else:
                        gx_rows.index_add_(0, fold_index.view(-1), pgm.view(-1, c))
            if dot_gate:  # the patches are no longer needed: the product overwrites them
                torch.sum(pm.mul_(pgm), -1, out=pg_dot[ch.start : end])

    fmt = memory_format_of(x)
    if need_x:
        ph, pw = plan.pad
        grid = gx_rows[:rows_n].view(plan.n, plan.hp, plan.wp, c)
        gx = torch.empty(x.shape, dtype=dtype, device=dev, memory_format=fmt)
        gx.copy_(grid[:, ph : ph + plan.h, pw : pw + plan.w].permute(0, 3, 1, 2))  # never alias the scratch
    else:
        gx = skipped(x)
    if need_w:
        seen = {e for ch in plan.chunks for e in ch.experts}
        for e in range(breadth):
            if e not in seen:
                gw[e].zero_()
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=dev)  # never alias the scratch
        grad_w.view(breadth * out_ch, c, kh * kw).copy_(gw.view(breadth * out_ch, kh * kw, c).mT)
    else:
        grad_w = skipped(x)
    if need_g and not plan.chunks:
        grad_gate = torch.zeros(gate.shape, dtype=gate.dtype, device=gate.device)
    elif dot_gate:
        grad_gate = _gate_grad_from_dot(pg_dot, grad, gate, bias, index, xview, w_flat, plan, cd)
    elif need_g:  # <g, pre>, with pre back in pixel order
        pre_nat = pre.index_select(0, plan.pixel_slot).view(plan.n, plan.h_out, plan.w_out, out_ch)
        grad_gate = torch.linalg.vecdot(pre_nat, grad.to(cd).permute(0, 2, 3, 1)).to(gate.dtype)
    else:
        grad_gate = skipped(x)
    return gx, grad_w, grad_b, grad_gate


def _gate_grad_from_dot(
    pg_dot: torch.Tensor,
    grad: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    xview: torch.Tensor,
    w_flat: torch.Tensor,
    plan: _Plan,
    cd: torch.dtype,
) -> torch.Tensor:
    """``grad_gate = <(gate*g) W, P> / gate + <g, b>`` per pixel (``pg_dot`` holds the dot per
    slot). Pixels whose gate is zero, non-finite or so small that ``gate*g`` may lose precision
    (below ``sqrt(tiny)``) get ``<g, P W^T + b>`` recomputed directly; hard routing's gate is 1."""
    gate_pix = gate.reshape(-1).to(cd)
    grad_gate = pg_dot.index_select(0, plan.pixel_slot).div_(gate_pix)
    g_flat = grad.to(cd).flatten(2)  # (N, out, HW): a view for NCHW and channels_last
    if bias is not None:  # <g, b> per pixel: a vector-matrix product over the channels
        grad_gate.view(plan.n, -1).add_(bias.to(cd) @ g_flat)
    threshold = math.sqrt(torch.finfo(cd).tiny)
    direct = torch.nonzero(~(gate_pix.abs() >= threshold) | ~torch.isfinite(gate_pix)).view(-1)
    if direct.numel():  # rare: one small gather and a batched matvec
        patches = torch.empty((direct.numel(), plan.kh, plan.kw, plan.c), dtype=cd, device=gate.device)
        _gather_patches(xview, plan.base.index_select(0, plan.pixel_slot.index_select(0, direct)), patches, plan)
        w_rows = w_flat.index_select(0, index.reshape(-1).index_select(0, direct))  # (m, out, K)
        pre = torch.bmm(w_rows, patches.view(direct.numel(), -1, 1)).squeeze(-1)
        if bias is not None:
            pre += bias.to(cd)
        hw = g_flat.shape[2]
        g_rows = g_flat[direct // hw, :, direct % hw]  # (m, out)
        grad_gate.index_copy_(0, direct, (g_rows * pre).sum(-1))
    return not_a_view(grad_gate.to(gate.dtype).view(gate.shape))


def _fold_tapwise(gx_rows: torch.Tensor, pm: torch.Tensor, base: torch.Tensor, taps: torch.Tensor) -> None:
    """Deterministic fold off the CPU (no atomics): per tap, the rows of distinct pixels hit
    distinct targets, so a gather, an add and a plain (non-accumulating) scatter do it."""
    c = gx_rows.shape[1]
    per_tap = pm.view(pm.shape[0], -1, c)
    for t in range(taps.numel()):
        target = base + taps[t]
        gx_rows.index_put_((target,), gx_rows.index_select(0, target).add_(per_tap[:, t]))
