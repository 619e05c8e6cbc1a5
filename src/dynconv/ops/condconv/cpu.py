"""``backend='cpu'`` for ``cond_conv2d``: grouped convolutions over chunks of examples, explicit backward.

Why: the grouped-conv trick (timm) mixes every example's kernel at once and runs one
grouped conv over the folded batch. On CPU, oneDNN runs that conv close to a dense one, and
no other formulation tried was faster (docs/performance.md), so the math stays; what
changes:

- the batch goes in chunks of examples (:data:`CHUNK_BYTES` of mixed kernels, input and
  output), so a dense layer does not write ``N`` kernels at once and every buffer is
  cache-sized (fresh large buffers also cost page faults);
- depthwise kernels larger than 3x3 take their gradient from a correlation of the input
  with the output gradient, run as a depthwise conv: oneDNN's depthwise weight gradient is
  an order of magnitude slower at 5x5 and 7x7;
- a channels_last batch is folded as channels_last (memory ``H, W, N, C``: one copy that
  moves whole pixels), so oneDNN runs its NHWC kernels instead of reordering every input
  and output into its blocked layout: depthwise layers always, dense ones on larger maps
  (:data:`NHWC_FOLD_MIN_PIXELS`); the experts are then mixed straight into channels_last
  kernel order, so no kernel-sized reorder runs either way;
- backward, per chunk: one ``aten.convolution_backward`` with an output mask (gradients
  nobody asked for, e.g. frozen experts or a first layer's input, are not computed), then
  the chunk's kernel gradients turn into the experts' gradient (accumulated in chunk order:
  deterministic) and the routing weights' gradient with two matmuls. The bias is folded
  into the conv; outputs keep the input's memory format.

Pure PyTorch, so it runs on any device. Measurements behind each choice: docs/performance.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._checks import conv_output_size
from ..custom_op import memory_format_of, not_a_view, skipped

_aten = torch.ops.aten
Pair = tuple[int, int]

#: Target size of one chunk's mixed kernels + input + output (bytes); at least one example
#: per chunk (the best measured size, docs/performance.md). Depthwise layers run the whole
#: batch at once: their mixed kernels are tiny, and copying each chunk's output into the
#: result costs more than chunks save.
CHUNK_BYTES = 8 * 2**20


def _experts_flat(weight: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """The experts as ``(E, out * in/g * kH * kW)`` rows, in the element order the fold's
    conv wants its kernels: ``out, in/g, kH, kW`` for the NCHW fold, ``out, kH, kW, in/g``
    (channels_last kernels) for the NHWC fold. oneDNN's NHWC kernels take channels_last
    weights and return channels_last weight gradients; mixing straight into that order
    saves a kernel-sized copy each way per chunk."""
    e = weight.shape[0]
    if nhwc:
        return weight.permute(0, 1, 3, 4, 2).reshape(e, -1)
    return weight.reshape(e, -1)


def _mix(w_flat: torch.Tensor, routing: torch.Tensor, weight_shape: torch.Size, nhwc: bool) -> torch.Tensor:
    """Per-example kernels as one conv's ``(n * out, in/g, kH, kW)`` weight (channels_last
    strides if ``nhwc``), one matmul over the rows of :func:`_experts_flat`."""
    in_g, kh, kw = weight_shape[2:]
    mixed = routing.to(w_flat.dtype) @ w_flat
    if nhwc:
        return mixed.view(-1, kh, kw, in_g).permute(0, 3, 1, 2)
    return mixed.view(-1, in_g, kh, kw)


def _output_hw(x: torch.Tensor, weight: torch.Tensor, stride: Pair, padding: Pair, dilation: Pair) -> tuple[int, int]:
    ho = conv_output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
    return ho, wo


def _chunks(x: torch.Tensor, weight: torch.Tensor, out_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` over the batch: chunks of about ``CHUNK_BYTES``, one for depthwise."""
    n = x.shape[0]
    per_example = (weight[0].numel() + math.prod(x.shape[1:]) + weight.shape[1] * out_hw[0] * out_hw[1]) * x.element_size()
    size = max(1, n if _depthwise(weight) else min(n, CHUNK_BYTES // max(1, per_example)))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


#: A channels_last batch is folded as channels_last (:func:`_fold`), so that oneDNN runs
#: its NHWC kernels, when its output has at least this many pixels per example; else NCHW.
#: Depthwise: always. Dense and grouped: from 16x16 on, since oneDNN's NHWC kernel gradient
#: is slow on smaller maps (measurements: docs/performance.md).
NHWC_FOLD_MIN_PIXELS = {"depthwise": 0, "dense": 256}


def _nhwc_fold(x: torch.Tensor, weight: torch.Tensor, out_hw: tuple[int, int]) -> bool:
    kind = "depthwise" if _depthwise(weight) else "dense"
    return memory_format_of(x) == torch.channels_last and out_hw[0] * out_hw[1] >= NHWC_FOLD_MIN_PIXELS[kind]


def _fold(t: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
    """``(n, C, H, W)`` -> ``(1, n*C, H, W)``: the batch as conv groups.

    NCHW: a view of an NCHW-contiguous ``t``. ``nhwc``: a channels_last folded tensor (memory
    ``H, W, n, C``), made from a channels_last ``t`` by one copy that moves whole pixels
    (as fast as a plain copy), so that oneDNN runs its NHWC kernels without the blocked-format
    reorders of every input and output; folding a channels_last batch as NCHW instead is an
    element-wise transpose, slower than the copy."""
    if not nhwc:
        return t.reshape(1, -1, *t.shape[2:])
    n, c, h, w = t.shape
    return t.permute(2, 3, 0, 1).contiguous().view(1, h, w, n * c).permute(0, 3, 1, 2)


def _empty_fold(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """An uninitialized tensor shaped and laid out like ``_fold(t, nhwc)``: for a conv
    backward that needs the input only for its shape."""
    n, c, h, w = t.shape
    if not nhwc:
        return t.new_empty((1, n * c, h, w))
    return t.new_empty((1, h, w, n * c)).permute(0, 3, 1, 2)


def _unfold(t_f: torch.Tensor, n: int) -> torch.Tensor:
    """``(1, n*C, H, W)`` -> ``(n, C, H, W)``, a view in whatever layout ``t_f`` has."""
    return t_f[0].view(n, -1, *t_f.shape[2:])


def _depthwise(weight: torch.Tensor) -> bool:
    """One input channel per group (depthwise, any channel multiplier)."""
    return weight.shape[2] == 1


#: Depthwise kernels up to this many taps take their gradient from oneDNN's conv backward
#: (at 3x3 both ways cost the same); larger ones from the correlation conv.
BACKWARD_WEIGHT_MAX_TAPS = 9


def _depthwise_kernel_grad(
    x_f: torch.Tensor, grad: torch.Tensor, kernel_hw: tuple[int, int], stride: Pair, padding: Pair, dilation: Pair,
    groups: int,
) -> torch.Tensor:
    """``d loss / d kernels`` of a depthwise conv as a correlation: a depthwise conv of the
    folded input with each channel's output gradient as its kernel; strides and dilations
    swap roles. Returns ``(n*out, 1, kH, kW)``."""
    n, out, ho, wo = grad.shape
    g_as_kernel = grad.reshape(n * out, 1, ho, wo)
    corr = F.conv2d(x_f, g_as_kernel, None, dilation, padding, stride, groups)  # (1, n*out, >=kH, >=kW)
    return corr[0, :, : kernel_hw[0], : kernel_hw[1]].reshape(n * out, 1, *kernel_hw)


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> torch.Tensor:
    """Forward pass; geometry arguments are int pairs."""
    n = x.shape[0]
    out = weight.shape[1]
    ho, wo = _output_hw(x, weight, stride, padding, dilation)
    fmt = memory_format_of(x)
    bias_n = (routing.to(bias.dtype) @ bias) if bias is not None else None  # (N, out)
    chunks = _chunks(x, weight, (ho, wo))
    nhwc = _nhwc_fold(x, weight, (ho, wo))
    w_flat = _experts_flat(weight, nhwc)
    y = None
    if len(chunks) != 1 or nhwc:  # else the conv's output is the result
        y = torch.empty((n, out, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    for s, e in chunks:
        kernels = _mix(w_flat, routing[s:e], weight.shape, nhwc)
        b = bias_n[s:e].reshape(-1) if bias_n is not None else None
        y_c = _unfold(F.conv2d(_fold(x[s:e], nhwc), kernels, b, stride, padding, dilation, groups * (e - s)), e - s)
        if y is None:
            return not_a_view(y_c.contiguous(memory_format=fmt))
        y[s:e] = y_c
    return y


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int, need_input: bool = True, need_params: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_weight, grad_bias, grad_routing)``; skipped ones are fresh empty tensors."""
    n = x.shape[0]
    e_count, out = weight.shape[:2]
    grad = grad.to(x.dtype)
    if not (need_input or need_params):
        return skipped(x), skipped(x), skipped(x), skipped(x)
    if n == 0:
        return (
            torch.zeros_like(x) if need_input else skipped(x),
            torch.zeros_like(weight) if need_params else skipped(x),
            torch.zeros_like(bias) if (need_params and bias is not None) else skipped(x),
            torch.zeros_like(routing) if need_params else skipped(x),
        )
    fmt = memory_format_of(x)
    chunks = _chunks(x, weight, tuple(grad.shape[2:]))
    nhwc = _nhwc_fold(x, weight, tuple(grad.shape[2:]))
    direct = len(chunks) == 1 and not nhwc  # the conv's input gradient is the result
    grad_x = skipped(x)
    if need_input and not direct:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    w_flat = _experts_flat(weight, nhwc)
    if need_params:
        grad_w = torch.zeros(w_flat.shape, dtype=x.dtype, device=x.device)
        grad_r = torch.empty((n, e_count), dtype=x.dtype, device=x.device)
        w_cd = w_flat.to(x.dtype)
        db = torch.empty((n, out), dtype=x.dtype, device=x.device) if bias is not None else None
    kernel_hw = tuple(weight.shape[3:])
    correlate = _depthwise(weight) and kernel_hw[0] * kernel_hw[1] > BACKWARD_WEIGHT_MAX_TAPS
    for s, e in chunks:
        kernels = _mix(w_flat, routing[s:e], weight.shape, nhwc)
        gx = gk = gb = None
        if need_input or (need_params and not correlate):
            # the bias gradient comes along with oneDNN's weight gradient; alone, it would
            # cost a weight gradient, so with the correlation it is a sum instead
            bias_grad = need_params and bias is not None and not correlate
            kernel_grad = need_params and not correlate
            # without the kernel gradient, the input only gives its shape: skip the fold's copy
            x_f = _fold(x[s:e], nhwc) if kernel_grad else _empty_fold(x[s:e], nhwc)
            gx, gk, gb = _aten.convolution_backward(
                _fold(grad[s:e], nhwc), x_f, kernels, [(e - s) * out] if bias_grad else None,
                list(stride), list(padding), list(dilation), False, [0, 0], groups * (e - s),
                [need_input, kernel_grad, bias_grad],
            )
        if need_params and bias is not None:  # per-example bias gradients (N, out)
            db[s:e] = gb.view(e - s, out) if gb is not None else grad[s:e].sum(dim=(2, 3))
        if need_params and correlate:  # an NCHW fold: oneDNN's NHWC correlation is no faster
            gk = _depthwise_kernel_grad(_fold(x[s:e]), grad[s:e], kernel_hw, stride, padding, dilation, groups * (e - s))
        if need_input and direct:
            grad_x = not_a_view(gx.reshape(x.shape).contiguous(memory_format=fmt))
        elif need_input:
            grad_x[s:e] = _unfold(gx, e - s)
        if need_params:
            gk = (gk.permute(0, 2, 3, 1) if nhwc else gk).reshape(e - s, -1)  # rows in w_flat's order
            grad_w.addmm_(routing[s:e].to(gk.dtype).t(), gk)  # chunk order: deterministic
            torch.mm(gk, w_cd.t(), out=grad_r[s:e])
    if not need_params:
        return grad_x, skipped(x), skipped(x), skipped(x)
    grad_b = skipped(x)
    if bias is not None:
        grad_b = (routing.to(db.dtype).t() @ db).to(bias.dtype)
        grad_r += db @ bias.to(db.dtype).t()
    if nhwc:
        grad_w = grad_w.view(e_count, out, *kernel_hw, weight.shape[2]).permute(0, 1, 4, 2, 3)
    return grad_x, grad_w.reshape(weight.shape).to(weight.dtype), grad_b, grad_r.to(routing.dtype)
