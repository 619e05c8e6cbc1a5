"""``backend='experts'`` for ``cond_conv2d``: every expert's conv as one dense conv, mixed by the routing weights.

Why: the per-example formulation (the ``cpu`` backend, the grouped-conv trick) mixes one
kernel per example, ``N * E * C_out * C_in/g * kH * kW`` multiply-adds, and writes, reorders
and reads those ``N`` kernels forward and backward. On small feature maps each kernel
serves few pixels, so that traffic, not the convolution, is the cost (issue 12: N128 C512
4x4, 4 experts: 16.8x a dense conv). Here the kernels are never mixed:

    y_n = sum_e r_ne (W_e * x_n) = [W_1 | ... | W_E] * [r_n1 x_n; ...; r_nE x_n]

one dense conv of the routing-scaled, expert-stacked input (``E * C_in`` channels) against the
experts concatenated along their input channels: the FLOPs of ``E`` dense convs, run as one
large GEMM, whatever the batch size. Groups and depthwise layers keep their grouping: the
stacked input is ordered ``(group, expert, channel)``, so group ``j`` of the conv sees every
expert's copy of its own channels.

Why this form and not the output-stacked one (one conv to ``E * C_out`` channels, then the
routing-weighted sum), which has the same conv FLOPs:

- the routing gradient: here ``d loss / d r_ne = <g_ne, x_n>``, with ``g`` the gradient of the
  stacked input, which the input gradient needs anyway (``dx_n = sum_e r_ne g_ne``). The
  output-stacked form needs every expert's output (``<grad_n, y_ne>``): ``E`` outputs held from
  forward to backward, or ``E`` more dense convs to recompute them;
- the conv writes the output once, not ``E`` outputs that a weighted sum reads back;
- transient memory: ``E`` x the input (the stacked input, then its gradient) instead of ``E`` x
  the output; larger only for strided or channel-reducing layers.

On output maps of at most :data:`PER_EXPERT_FORWARD_MAX_PIXELS` pixels the forward runs as
``E`` dense-shaped convs of ``r_e x`` summed instead (the same FLOPs): there the stacked conv
over ``E * C_in`` channels is the slower one, as in backward below.

Backward: one dense-shaped ``aten.convolution_backward`` per expert (gradients nobody asked
for are not computed): ``g_e``, the gradient w.r.t. ``r_e x``, gives ``dx += r_e g_e`` and
``dr_e = <g_e, x>``, and the weight gradient of expert ``e`` reads ``r_e x``. Not one backward
over the stacked ``E * C_in`` channels: at small maps oneDNN's backward is far slower per FLOP
with that many input channels (N128 C512 4x4: 7x a dense conv's fwd+bwd for 4x its FLOPs),
while ``E`` dense-shaped calls cost about ``E`` dense backwards. Nothing stacked is kept from
forward to backward (the custom op saves only its inputs).

Outputs and input gradients keep the input's memory format (the stacked input is built in
it, so oneDNN / cuDNN run their NHWC kernels on channels_last batches). Half-precision inputs
are computed in fp32 off the GPU (:func:`~dynconv.ops.custom_op.compute_dtype`). Pure
PyTorch: it runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import conv_output_size
from ..custom_op import compute_dtype, memory_format_of, not_a_view, poison, skipped

_aten = torch.ops.aten
Pair = tuple[int, int]


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs off the GPU (slow and lossy there), else ``x``'s dtype
    (cuDNN accumulates half-precision convs in fp32 itself)."""
    return x.dtype if x.is_cuda else compute_dtype(x.dtype)


def stacked_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(E, out, in/g, kH, kW)`` -> ``(out, E * in/g, kH, kW)``: each output channel's kernels
    of all experts side by side, in the order of :func:`stack_input`'s channels."""
    experts, out, per_group, kh, kw = weight.shape
    return weight.transpose(0, 1).reshape(out, experts * per_group, kh, kw)


def _stacked_buffer(x: torch.Tensor, experts: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``(N, groups, E, in/g, H, W)`` buffer laid out so that merging its
    dims 1-3 gives an ``(N, E * in, H, W)`` tensor in ``x``'s memory format (poisoned under
    :data:`~dynconv.ops.custom_op.POISON_OUTPUTS`)."""
    n, c, h, w = x.shape
    shape = (n, groups, experts, c // groups)
    if memory_format_of(x) == torch.channels_last:
        return poison(x.new_empty((n, h, w, *shape[1:]), dtype=dtype)).permute(0, 3, 4, 5, 1, 2)
    return poison(x.new_empty((*shape, h, w), dtype=dtype))


def stack_input(x: torch.Tensor, routing: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The routing-scaled, expert-stacked input ``(N, E * in, H, W)`` in ``x``'s memory
    format: channel ``(j * E + e) * in/g + c`` holds ``routing[n, e] * x[n, j * in/g + c]``."""
    n, experts = routing.shape
    buffer = _stacked_buffer(x, experts, groups, dtype)
    torch.mul(x.unflatten(1, (groups, 1, -1)), routing.to(dtype).view(n, 1, experts, 1, 1, 1), out=buffer)
    return buffer.flatten(1, 3)


#: Output maps of at most this many pixels per example run the forward as one dense-shaped
#: conv per expert (``y = sum_e W_e * (r_e x)``), larger ones as one stacked conv. Measured
#: (2-core VM, fp32, N128, 3x3, forward only, E = 4 / 8): at 8x8 and 4x4 the per-expert form
#: takes 12-21% less time in NCHW and 14-56% less in channels_last, where oneDNN's NHWC conv
#: over E x C_in channels at 16 pixels runs at under half its usual rate (C512 4x4 E4: 8.7x a
#: dense conv stacked, 4.0x per expert); at 32x32 it takes 18-45% more; 16x16 is split by
#: layout (docs/performance.md).
PER_EXPERT_FORWARD_MAX_PIXELS = 64


def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> torch.Tensor:
    """Forward pass; geometry arguments are int pairs."""
    dtype = _math_dtype(x)
    ho = conv_output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
    if ho * wo <= PER_EXPERT_FORWARD_MAX_PIXELS:
        x_math = x.to(dtype)
        r = routing.to(dtype)
        y = None
        for e in range(weight.shape[0]):
            y_e = F.conv2d(x_math * r[:, e, None, None, None], weight[e].to(dtype), None, stride, padding, dilation, groups)
            y = y_e if y is None else y.add_(y_e)
    else:
        stacked = stack_input(x, routing, groups, dtype)
        y = F.conv2d(stacked, stacked_weight(weight).to(dtype), None, stride, padding, dilation, groups)
        del stacked
    if bias is not None:  # per-example biases: a conv's bias is per channel only
        y += (routing.to(dtype) @ bias.to(dtype))[:, :, None, None]
    return not_a_view(y.to(x.dtype).contiguous(memory_format=memory_format_of(x)))


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int, need_input: bool = True, need_params: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_weight, grad_bias, grad_routing)``; skipped ones are fresh empty tensors."""
    if not (need_input or need_params):
        return skipped(x), skipped(x), skipped(x), skipped(x)
    n, experts = routing.shape
    dtype = _math_dtype(x)
    fmt = memory_format_of(x)
    grad = grad.to(dtype)
    r = routing.to(dtype)
    x_math = x.to(dtype)
    # One dense-shaped convolution_backward per expert, not one over the stacked E x C_in
    # channels: oneDNN's backward at small maps is far slower per FLOP with that many input
    # channels (C512 4x4: 7x a dense conv for 4x its FLOPs), while E dense-shaped calls cost
    # about E dense backwards. g_e (the gradient w.r.t. r_e x) does not depend on r.
    grad_x = torch.zeros_like(x, dtype=dtype, memory_format=fmt) if need_input else skipped(x)
    grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_params else None
    grad_r = torch.empty((n, experts), dtype=dtype, device=x.device) if need_params else None
    for e in range(experts):
        r_e = r[:, e, None, None, None]
        # the weight gradient reads the scaled input; the input gradient needs only its shape
        scaled = x_math * r_e if need_params else x_math
        grad_scaled, grad_w_e, _ = _aten.convolution_backward(
            grad, scaled, weight[e].to(dtype), None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [True, need_params, False],
        )
        del scaled
        if need_input:  # dx_n = sum_e r_ne g_ne
            grad_x.addcmul_(grad_scaled, r_e)
        if need_params:  # d loss / d r_ne = <g_ne, x_n> (+ the mixed bias's share below)
            grad_w[e] = grad_w_e
            grad_r[:, e] = (grad_scaled * x_math).sum(dim=(1, 2, 3))
    if need_input:
        grad_x = grad_x.to(x.dtype)
    if not need_params:
        return grad_x, skipped(x), skipped(x), skipped(x)

    grad_b = skipped(x)
    if bias is not None:
        grad_per_example = grad.sum(dim=(2, 3))  # (N, out): d loss / d bias_n
        grad_b = (r.t() @ grad_per_example).to(bias.dtype)
        grad_r += grad_per_example @ bias.to(dtype).t()
    return grad_x, grad_w.to(weight.dtype).contiguous(), grad_b, grad_r.to(routing.dtype)
