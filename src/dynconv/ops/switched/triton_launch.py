"""Launches the Triton kernels of the hard-routed switched conv (``backend='triton'``).

Why: a hard-routed switched conv does the FLOPs of one dense conv whatever the breadth, but
only if each output pixel is multiplied by its own expert's weights without computing the
others. The kernels (:mod:`.triton_kernels`) sort output pixels by expert (MoE-style grouped
GEMM): every tile of ``BLOCK_M`` sorted pixels belongs to one expert, so a tile is a plain
GEMM against that expert's weights, with the input patches gathered on the fly from ``x``
(implicit GEMM: no im2col buffer and no ``breadth`` outputs in global memory).

Kernels (fp32 accumulation; output in the input dtype):

* forward: ``y = gate * (patches @ W_e + bias)`` per tile;
* grad input (+ the gate's gradient): per tile and kernel tap ``(i, j)``,
  ``gp = grad_y @ W_e[:, :, i, j]`` (unscaled); ``grad_x += gate * gp`` at the tap's input
  pixels, and ``grad_gate += <gp, x patch>``, that is ``<grad_y, conv(x, W_e)>`` without
  recomputing the conv; the ``<grad_y, bias>`` part is added in PyTorch;
* grad weight: per tile, ``grad_y^T @ patches`` into the tile's expert;
* grad bias: a PyTorch reduction of ``grad_y * gate``.

Determinism: by default grad input / grad weight / grad gate accumulate with fp32 atomics
(non-deterministic summation order). With ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) grad input runs one launch per kernel tap with
plain read-add-write (within one tap each input pixel gets at most one contribution), and
grad weight runs one program per (expert, out block, in block) looping over that expert's
tiles in order (one host sync for the longest expert).

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation; fp32 inputs use
TF32 dots as ``nn.Conv2d`` does (:func:`..triton_utils.precision`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton

from ..custom_op import memory_format_of, new_output, poison, skipped
from ..triton_utils import block, dot_upcast, for_gpu, precision
from .functional import check_index_range, output_dtype, sort_key_dtype
from .triton_kernels import (
    switched_bwd_input_kernel,
    switched_bwd_weight_atomic_kernel,
    switched_bwd_weight_det_kernel,
    switched_fwd_kernel,
)

#: Tiles summed per program by the (atomic) weight-gradient kernel before its atomic flush.
TILES_PER_PROGRAM = 8


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
    check_index_range(flat, breadth)
    key_dtype = sort_key_dtype(breadth)  # the expert ids 0..breadth are searched for too
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


class _Config(NamedTuple):
    block_m: int
    block_n: int  # forward: output channels
    block_k: int  # forward: input channels per step
    block_c: int  # backward: input channels
    block_o: int  # backward: output channels
    num_warps: int
    num_stages: int


def _config(x: torch.Tensor, out_ch: int) -> _Config:
    """The tile choices of every switched-conv kernel: GPU tiles, or small ones under the
    interpreter (numpy stays fast on tiny test shapes)."""
    c = x.shape[1]
    if for_gpu(x):
        return _Config(64, block(out_ch, 16, 128), block(c, 16, 64), block(c, 16, 64), block(out_ch, 16, 64), 4, 3)
    return _Config(32, block(out_ch, 16, 32), block(c, 16, 32), block(c, 16, 32), block(out_ch, 16, 32), 1, 1)


def _geometry(x, weight, index, stride, padding, dilation):
    n, c, h, w = x.shape
    _, h_out, w_out = index.shape
    return dict(
        C=c, H=h, W=w, O=weight.shape[1], HW_OUT=h_out * w_out, W_OUT=w_out,
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
    )


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, gate: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], deterministic: bool = False,
) -> torch.Tensor:
    """``gate * (conv(x, weight[index]) + bias)`` by the fused forward kernel (no autograd)."""
    breadth, out_ch, _, kh, kw = weight.shape
    n, h_out, w_out = index.shape
    cfg = _config(x, out_ch)
    tiles = _make_tiles(index, breadth, cfg.block_m)
    y = new_output((n, out_ch, h_out, w_out), x, dtype=output_dtype(x, gate))
    if y.numel() == 0:
        return y
    g = _geometry(x, weight, index, stride, padding, dilation)
    grid = (tiles.count, triton.cdiv(out_ch, cfg.block_n))
    switched_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, gate, y,
        tiles.order, tiles.tile_e, tiles.tile_s, tiles.tile_end,
        *_geometry_args(g), *x.stride(), *weight.stride(), *gate.stride(), *y.stride(), *_conv_args(g),
        KH=kh, KW=kw, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision(x), UPCAST=dot_upcast(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def _geometry_args(g: dict) -> tuple:
    return g["C"], g["H"], g["W"], g["O"], g["HW_OUT"], g["W_OUT"]


def _conv_args(g: dict) -> tuple:
    return g["STRIDE_H"], g["STRIDE_W"], g["PAD_H"], g["PAD_W"], g["DIL_H"], g["DIL_W"]


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
    gate: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], deterministic: bool,
    needs: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``x``, ``weight``, ``bias``, ``gate`` (see the module docstring);
    :func:`..custom_op.skipped` for those ``needs`` does not ask for."""
    need_x, need_w, need_b, need_g = needs
    breadth, out_ch, c, kh, kw = weight.shape
    taps = kh * kw
    cfg = _config(x, out_ch)
    tiles = _make_tiles(index, breadth, cfg.block_m)
    g = _geometry(x, weight, index, stride, padding, dilation)
    dot_precision = precision(x)
    fmt = memory_format_of(x)
    gate_f = gate.float()
    grad_b = (
        (grad.float() * gate_f.unsqueeze(1)).sum((0, 2, 3)).to(weight.dtype)
        if need_b
        else skipped(x)
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
            BLOCK_O=cfg.block_o, PRECISION=dot_precision, UPCAST=dot_upcast(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if deterministic:
            for tap in range(taps):
                switched_bwd_input_kernel[(tiles.count, 1)](*args, tap, *strides, ATOMIC=False, **meta)
        else:
            switched_bwd_input_kernel[(tiles.count, taps)](*args, 0, *strides, ATOMIC=True, **meta)
    if need_w:
        n_cb = triton.cdiv(c, cfg.block_c)
        common = (
            *_geometry_args(g), n_cb,
        )
        if deterministic:
            gw32 = poison(torch.empty(weight.shape, dtype=torch.float32, device=x.device))
            counts = tiles.seg[1:] - tiles.seg[:-1]
            max_tiles = (int(counts.max()) + cfg.block_m - 1) // cfg.block_m if counts.numel() else 0
            grid = (breadth, triton.cdiv(out_ch, cfg.block_o), taps * n_cb)
            switched_bwd_weight_det_kernel[grid](
                grad, x, gate, gw32, tiles.order, tiles.seg, *common, max_tiles,
                *grad.stride(), *x.stride(), *gate.stride(), *gw32.stride(), *_conv_args(g),
                KW=kw, BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o, BLOCK_C=cfg.block_c, PRECISION=dot_precision, UPCAST=dot_upcast(x),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        else:
            gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            if nonempty:
                grid = (triton.cdiv(tiles.count, TILES_PER_PROGRAM), triton.cdiv(out_ch, cfg.block_o), taps * n_cb)
                switched_bwd_weight_atomic_kernel[grid](
                    grad, x, gate, gw32, tiles.order, tiles.tile_e, tiles.tile_s, tiles.tile_end, *common,
                    tiles.count, *grad.stride(), *x.stride(), *gate.stride(), *gw32.stride(), *_conv_args(g),
                    KW=kw, TILES_PER_PROGRAM=TILES_PER_PROGRAM, BLOCK_M=cfg.block_m, BLOCK_O=cfg.block_o, BLOCK_C=cfg.block_c, PRECISION=dot_precision, UPCAST=dot_upcast(x),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )  # fmt: skip
        grad_w = gw32.to(weight.dtype)
    else:
        grad_w = skipped(x)
    if need_g and bias is not None:
        gg32 += torch.einsum("nohw,o->nhw", grad.float(), bias.float())
    gx = gx32.to(x.dtype) if need_x else skipped(x)
    return gx, grad_w, grad_b, gg32.to(gate.dtype) if need_g else skipped(x)
