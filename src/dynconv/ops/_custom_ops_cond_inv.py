"""``torch.library`` custom ops for the fast ``cond_conv2d`` / ``involution2d`` backends.

Why: the Triton launches (and the CPU paths' explicit backward loops) are opaque to
``torch.compile``; as custom ops with fake (meta) implementations and registered
autograd formulas they trace as single graph nodes, so ``torch.compile(fullgraph=True)``
does not break graphs. Importing this module registers the ops and fills the
``BACKENDS`` registries of :mod:`.condconv` (``'triton'``, ``'cpu'``) and
:mod:`.involution` (``'triton'``, ``'cpu'``). Triton itself is imported lazily, on the
first launch, so ``TRITON_INTERPRET`` may be set any time before that.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .._checks import conv_output_size, pair
from . import condconv as _condconv
from . import involution as _involution
from ._backend import triton_available
from ._custom_ops import memory_format_of, skipped

IMPLS = ("triton", "cpu")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# --------------------------------------------------------------------------- cond_conv2d


def _cc_module(impl: str):
    _check_impl(impl)
    if impl == "triton":
        from . import condconv_triton as m

        return m.cond_conv2d_forward, m.cond_conv2d_backward
    from . import condconv_cpu as m

    return m.cond_conv2d_cpu_forward, m.cond_conv2d_cpu_backward


@torch.library.custom_op("dynconv::cond_conv2d_fused", mutates_args=())
def cond_conv2d_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    routing_weights: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    impl: str,
) -> torch.Tensor:
    """CondConv forward by ``impl`` (``'triton'`` or ``'cpu'``); geometry as int pairs."""
    fwd, _ = _cc_module(impl)
    return fwd(x, weight, bias, routing_weights, tuple(stride), tuple(padding), tuple(dilation), groups)


@cond_conv2d_fused.register_fake
def _(x, weight, bias, routing_weights, stride, padding, dilation, groups, impl):
    ho = conv_output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[1], ho, wo)).contiguous(memory_format=memory_format_of(x))


@torch.library.custom_op("dynconv::cond_conv2d_fused_backward", mutates_args=())
def cond_conv2d_fused_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    routing_weights: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    impl: str,
    need_input: bool,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias, grad_routing)``; skipped ones are fresh empty tensors."""
    _, bwd = _cc_module(impl)
    return bwd(
        grad, x, weight, bias, routing_weights, tuple(stride), tuple(padding), tuple(dilation), groups,
        need_input=need_input, need_params=need_params,
    )


@cond_conv2d_fused_backward.register_fake
def _(grad, x, weight, bias, routing_weights, stride, padding, dilation, groups, impl, need_input, need_params):
    gx = x.new_empty(x.shape).contiguous(memory_format=memory_format_of(x)) if need_input else skipped(x)
    if not need_params:
        return gx, skipped(x), skipped(x), skipped(x)
    gb = bias.new_empty(bias.shape) if bias is not None else skipped(x)
    return gx, weight.new_empty(weight.shape), gb, routing_weights.new_empty(routing_weights.shape)


def _cc_setup(ctx, inputs, output):
    x, weight, bias, routing, stride, padding, dilation, groups, impl = inputs
    ctx.save_for_backward(x, weight, bias, routing)
    ctx.geometry = (stride, padding, dilation, groups, impl)


def _cc_backward(ctx, grad):
    x, weight, bias, routing = ctx.saved_tensors
    stride, padding, dilation, groups, impl = ctx.geometry
    need = ctx.needs_input_grad
    need_params = bool(need[1] or need[2] or need[3])
    gx, gw, gb, gr = torch.ops.dynconv.cond_conv2d_fused_backward(
        grad, x, weight, bias, routing, stride, padding, dilation, groups, impl, bool(need[0]), need_params
    )
    return (
        gx if need[0] else None,
        gw if need[1] else None,
        gb if (need[2] and bias is not None) else None,
        gr if need[3] else None,
        None, None, None, None, None,
    )


cond_conv2d_fused.register_autograd(_cc_backward, setup_context=_cc_setup)


# --------------------------------------------------------------------------- involution2d


def _inv_module(impl: str):
    _check_impl(impl)
    if impl == "triton":
        from . import involution_triton as m

        return m.involution2d_forward, m.involution2d_backward
    from . import involution_cpu as m

    return m.involution2d_cpu_forward, m.involution2d_cpu_backward


@torch.library.custom_op("dynconv::involution2d_fused", mutates_args=())
def involution2d_fused(
    x: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    impl: str,
) -> torch.Tensor:
    """Involution forward by ``impl`` (``'triton'`` or ``'cpu'``); geometry as int pairs."""
    fwd, _ = _inv_module(impl)
    return fwd(x, kernel, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups)


@involution2d_fused.register_fake
def _(x, kernel, kernel_size, stride, padding, dilation, groups, impl):
    shape = (x.shape[0], x.shape[1], kernel.shape[3], kernel.shape[4])
    return x.new_empty(shape).contiguous(memory_format=memory_format_of(x))


@torch.library.custom_op("dynconv::involution2d_fused_backward", mutates_args=())
def involution2d_fused_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    impl: str,
    need_input: bool,
    need_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_kernel)``; a skipped one is a fresh empty tensor."""
    _, bwd = _inv_module(impl)
    return bwd(
        grad, x, kernel, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups,
        need_input=need_input, need_kernel=need_kernel,
    )


@involution2d_fused_backward.register_fake
def _(grad, x, kernel, kernel_size, stride, padding, dilation, groups, impl, need_input, need_kernel):
    gx = x.new_empty(x.shape).contiguous(memory_format=memory_format_of(x)) if need_input else skipped(x)
    gk = kernel.new_empty(kernel.shape) if need_kernel else skipped(x)
    return gx, gk


def _inv_setup(ctx, inputs, output):
    x, kernel, kernel_size, stride, padding, dilation, groups, impl = inputs
    ctx.save_for_backward(x, kernel)
    ctx.geometry = (kernel_size, stride, padding, dilation, groups, impl)


def _inv_backward(ctx, grad):
    x, kernel = ctx.saved_tensors
    kernel_size, stride, padding, dilation, groups, impl = ctx.geometry
    need = ctx.needs_input_grad
    gx, gk = torch.ops.dynconv.involution2d_fused_backward(
        grad, x, kernel, kernel_size, stride, padding, dilation, groups, impl, bool(need[0]), bool(need[1])
    )
    return (gx if need[0] else None, gk if need[1] else None, None, None, None, None, None, None)


involution2d_fused.register_autograd(_inv_backward, setup_context=_inv_setup)


# --------------------------------------------------------------------------- backend registration


def _geometry(stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    if isinstance(padding, str):
        raise TypeError(f"padding must be an int or a pair of ints for the fused backends, got {padding!r}")
    return (
        list(pair(stride, "stride", minimum=1)),
        list(pair(padding, "padding")),
        list(pair(dilation, "dilation", minimum=1)),
    )


_TRITON = triton_available()


def _require_triton(x: torch.Tensor, op: str) -> None:
    # not _backend.triton_usable_on: its lru_cache makes dynamo warn inside compiled code
    if not (_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")):
        raise RuntimeError(
            f"{op}(backend='triton') needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); "
            f"x is on {x.device}"
        )


def cond_conv2d_triton(x, weight, bias, routing_weights, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``cond_conv2d`` through the fused Triton kernels."""
    _require_triton(x, "cond_conv2d")
    s, p, d = _geometry(stride, padding, dilation)
    return torch.ops.dynconv.cond_conv2d_fused(x, weight, bias, routing_weights, s, p, d, groups, "triton")


def cond_conv2d_cpu(x, weight, bias, routing_weights, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``cond_conv2d`` through the CPU path (explicit backward)."""
    s, p, d = _geometry(stride, padding, dilation)
    return torch.ops.dynconv.cond_conv2d_fused(x, weight, bias, routing_weights, s, p, d, groups, "cpu")


def involution2d_triton(x, kernel, kernel_size, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``involution2d`` through the Triton kernels."""
    _require_triton(x, "involution2d")
    s, p, d = _geometry(stride, padding, dilation)
    k = list(pair(kernel_size, "kernel_size", minimum=1))
    return torch.ops.dynconv.involution2d_fused(x, kernel, k, s, p, d, groups, "triton")


def involution2d_cpu(x, kernel, kernel_size, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``involution2d`` through the CPU tap-loop path (no unfold buffer)."""
    s, p, d = _geometry(stride, padding, dilation)
    k = list(pair(kernel_size, "kernel_size", minimum=1))
    return torch.ops.dynconv.involution2d_fused(x, kernel, k, s, p, d, groups, "cpu")


_condconv.BACKENDS["cpu"] = cond_conv2d_cpu
_involution.BACKENDS["cpu"] = involution2d_cpu
if _TRITON:
    _condconv.BACKENDS["triton"] = cond_conv2d_triton
    _involution.BACKENDS["triton"] = involution2d_triton
