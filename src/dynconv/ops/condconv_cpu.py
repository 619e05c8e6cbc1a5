"""CPU path for ``cond_conv2d``: one grouped convolution over the folded batch, explicit backward.

Why: on CPU, oneDNN's grouped convolution over the folded batch turned out to be the
fastest formulation we measured (a per-example loop of dense convs, chunked
unfold + batched GEMM and a tap-wise batched GEMM were all slower on the benchmark
shapes, see docs/performance.md), so the forward keeps that math. What this path adds
over the autograd-driven grouped-conv trick is an explicit backward: one
``aten.convolution_backward`` call with an output mask (gradients nobody asked for,
e.g. frozen experts or a first layer's input, are not computed), the experts' and
routing weights' gradients as two matmuls on each example's kernel gradient, the bias
folded into the conv, outputs in the input's memory format, and a single graph node for
``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import conv_output_size

_aten = torch.ops.aten
Pair = tuple[int, int]


def _mix(weight: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """Per-example kernels ``(N, out, in/g, kH, kW)``, one matmul."""
    e = weight.shape[0]
    return (routing.to(weight.dtype) @ weight.reshape(e, -1)).view(routing.shape[0], *weight.shape[1:])


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def cond_conv2d_cpu_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> torch.Tensor:
    """Forward pass; geometry arguments are int pairs."""
    n = x.shape[0]
    out = weight.shape[1]
    if n == 0:  # a grouped conv with 0 groups is an error: return the empty output directly
        ho = conv_output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
        wo = conv_output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
        return x.new_empty((0, out, ho, wo))
    kernels = _mix(weight, routing).reshape(n * out, *weight.shape[2:])
    bias_n = (routing.to(bias.dtype) @ bias).reshape(-1) if bias is not None else None
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernels, bias_n, stride, padding, dilation, groups * n)
    y = y.view(n, out, *y.shape[2:])
    if _channels_last(x):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def cond_conv2d_cpu_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: torch.Tensor,
    stride: Pair, padding: Pair, dilation: Pair, groups: int, need_input: bool = True, need_params: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_weight, grad_bias, grad_routing)``; skipped ones are empty tensors."""
    n = x.shape[0]
    e, out = weight.shape[:2]
    grad = grad.to(x.dtype)
    empty = x.new_empty(0)
    if not (need_input or need_params):
        return empty, empty, empty, empty
    if n == 0:
        return (
            torch.zeros_like(x) if need_input else empty,
            torch.zeros_like(weight) if need_params else empty,
            torch.zeros_like(bias) if (need_params and bias is not None) else empty,
            torch.zeros_like(routing) if need_params else empty,
        )
    kernels = _mix(weight, routing).reshape(n * out, *weight.shape[2:])
    gx, gk, _ = _aten.convolution_backward(
        grad.reshape(1, -1, *grad.shape[2:]), x.reshape(1, -1, *x.shape[2:]), kernels, None,
        list(stride), list(padding), list(dilation), False, [0, 0], groups * n, [need_input, need_params, False],
    )
    grad_x = empty
    if need_input:
        grad_x = gx.view(x.shape)
        if _channels_last(x):
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
    if not need_params:
        return grad_x, empty, empty, empty
    grad_k = gk.reshape(n, -1)
    grad_w = (routing.to(grad_k.dtype).t() @ grad_k).view(weight.shape).to(weight.dtype)
    grad_r = grad_k @ weight.reshape(e, -1).to(grad_k.dtype).t()
    grad_b = empty
    if bias is not None:
        db = grad.sum(dim=(2, 3))
        grad_b = (routing.to(db.dtype).t() @ db).to(bias.dtype)
        grad_r = grad_r + db @ bias.to(db.dtype).t()
    return grad_x, grad_w, grad_b, grad_r.to(routing.dtype)
