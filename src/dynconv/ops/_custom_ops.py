"""``torch.library`` custom ops for the hard-routed switched convolution.

Why: a fast backend is opaque code (a Triton launch, a Python loop over experts). Wrapped as
a custom op with a fake (meta) implementation, ``torch.compile(fullgraph=True)`` traces it as
one node without graph breaks, ``torch.export`` records it with symbolic (dynamic) batch
sizes, and ``register_autograd`` gives it a backward that is itself a custom op.

Each backend supplies two plain functions (no autograd inside):

* ``forward(x, weight, bias, index, gate, stride, padding, dilation, deterministic) -> y``
* ``backward(grad_y, x, weight, bias, index, gate, stride, padding, dilation, deterministic,
  needs) -> (grad_x, grad_weight, grad_bias, grad_gate)``, ``needs`` saying which of the
  four are wanted; unwanted ones may be zeros (they are dropped).

``define_switched_op`` turns them into ``dynconv::switched_conv2d_<name>`` and
``dynconv::switched_conv2d_<name>_backward``. The autograd context saves only the inputs
(``x``, ``weight``, ``bias``, ``index``, ``gate``): no expert outputs, no patches.

Output layouts are fixed by rules shared with the fake implementations (inductor checks that
real strides match the fake ones): ``y`` and ``grad_x`` are channels_last exactly when ``x``
is channels_last and not plain-contiguous, and contiguous otherwise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

ForwardFn = Callable[..., torch.Tensor]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

_FWD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor gate, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, bool deterministic) -> Tensor"
)
_BWD_SCHEMA = (
    "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor gate, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, bool deterministic, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)"
)

_OPS: dict[str, Callable[..., torch.Tensor]] = {}


def not_a_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that is not a view. Why: a ``torch.library`` custom op copies any
    output that is a view (a 25 MB output: +2.7 ms on the 2-vCPU VM), while a detached alias
    of a fresh intermediate is neither a view nor aliased with the op's inputs."""
    return t.detach() if t._is_view() else t


def skipped(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty tensor in the slot of a gradient nobody asked for. Why fresh: a
    ``torch.library`` custom op may not return one tensor twice (it raises), so one shared
    empty tensor for two skipped gradients would fail."""
    return like.new_empty(0)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout outputs follow: channels_last only for a genuinely channels_last ``x``."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def output_dtype(x: torch.Tensor, gate: torch.Tensor) -> torch.dtype:
    """``gate * conv(x)`` promotes like the reference does."""
    return torch.promote_types(x.dtype, gate.dtype)


def _fake_forward(x, weight, bias, index, gate, stride, padding, dilation, deterministic):
    n, h_out, w_out = index.shape
    return torch.empty(
        (n, weight.shape[1], h_out, w_out),
        dtype=output_dtype(x, gate),
        device=x.device,
        memory_format=memory_format_of(x),
    )


def _fake_backward(grad, x, weight, bias, index, gate, stride, padding, dilation, deterministic, needs):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    gb = torch.empty((weight.shape[1],), dtype=weight.dtype if bias is None else bias.dtype, device=weight.device)
    gg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    return gx, gw, gb, gg


def define_switched_op(name: str, forward: ForwardFn, backward: BackwardFn) -> Callable[..., torch.Tensor]:
    """Register ``dynconv::switched_conv2d_<name>`` (+ backward op) and return the forward op.

    Idempotent per ``name`` so that a module re-import does not try to redefine the op.
    """
    if name in _OPS:
        return _OPS[name]
    qual = f"dynconv::switched_conv2d_{name}"

    def _fwd_impl(x, weight, bias, index, gate, stride, padding, dilation, deterministic):
        return forward(x, weight, bias, index, gate, tuple(stride), tuple(padding), tuple(dilation), deterministic)

    def _bwd_impl(grad, x, weight, bias, index, gate, stride, padding, dilation, deterministic, needs):
        return tuple(
            backward(
                grad, x, weight, bias, index, gate, tuple(stride), tuple(padding), tuple(dilation), deterministic,
                tuple(needs),
            )
        )

    fwd_op = torch.library.custom_op(qual, _fwd_impl, mutates_args=(), schema=_FWD_SCHEMA)
    fwd_op.register_fake(_fake_forward)
    bwd_op = torch.library.custom_op(qual + "_backward", _bwd_impl, mutates_args=(), schema=_BWD_SCHEMA)
    bwd_op.register_fake(_fake_backward)

    def setup_context(ctx, inputs, output):
        x, weight, bias, index, gate, stride, padding, dilation, deterministic = inputs
        ctx.save_for_backward(x, weight, bias, index, gate)
        ctx.conv_args = (stride, padding, dilation, deterministic)

    def backward_rule(ctx, grad):
        x, weight, bias, index, gate = ctx.saved_tensors
        stride, padding, dilation, deterministic = ctx.conv_args
        need = ctx.needs_input_grad
        needs = [bool(need[0]), bool(need[1]), bool(need[2]) and bias is not None, bool(need[4])]
        gx, gw, gb, gg = bwd_op(grad, x, weight, bias, index, gate, stride, padding, dilation, deterministic, needs)
        return (
            gx if needs[0] else None,
            gw if needs[1] else None,
            gb if needs[2] else None,
            None,
            gg if needs[3] else None,
            None,
            None,
            None,
            None,
        )

    fwd_op.register_autograd(backward_rule, setup_context=setup_context)
    _OPS[name] = fwd_op
    return fwd_op


def call_switched_op(
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing: tuple[torch.Tensor, torch.Tensor],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Normalise the conv arguments to pairs and call a registered op.

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    from .._checks import pair

    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    index, gate = routing
    return op(
        x,
        weight,
        bias,
        index,
        gate,
        list(pair(stride, "stride", minimum=1)),
        list(pair(padding, "padding")),
        list(pair(dilation, "dilation", minimum=1)),
        bool(deterministic),
    )
