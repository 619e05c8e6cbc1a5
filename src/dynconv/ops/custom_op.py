"""One way to define dynconv's custom ops, and the conventions every backend follows.

Why custom ops: a fast backend is opaque code (a Triton launch, a Python loop over experts
or taps). Wrapped by ``torch.library`` as a custom op with a fake (meta) implementation,
``torch.compile(fullgraph=True)`` traces it as one node without graph breaks,
``torch.export`` records it (with a symbolic batch size), and ``register_autograd`` gives it
a backward that is itself a custom op. :func:`define_op` registers such a pair,
``dynconv::<name>`` and ``dynconv::<name>_backward``; the autograd context saves only the
op's tensor inputs (no intermediate results).

Conventions (the fakes follow them too, since inductor checks real outputs against them):

* the backward op returns one gradient per differentiable input; a gradient nobody asked
  for is :func:`skipped`, a fresh empty tensor, neither computed nor allocated;
* outputs and input gradients are channels_last exactly when the input is
  (:func:`memory_format_of`), contiguous otherwise, and never views (:func:`not_a_view`);
* half-precision (fp16/bf16) math off the GPU runs in fp32 (:func:`compute_dtype`) and is
  rounded once at the end;
* with :data:`POISON_OUTPUTS`, outputs are filled with NaN before the backend writes them
  (:func:`poison`), so that a test sees every element a backend fails to write.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

#: Test switch: fill outputs with NaN before a backend writes them. Buffers that a backend
#: accumulates into start at zero and are not poisoned. Default from the environment
#: variable ``DYNCONV_POISON_OUTPUTS=1``; tests set it with ``monkeypatch``.
POISON_OUTPUTS: bool = os.environ.get("DYNCONV_POISON_OUTPUTS", "0") == "1"

_DEFINED: dict[str, Callable[..., torch.Tensor]] = {}


def poison(t: torch.Tensor) -> torch.Tensor:
    """``t``, NaN-filled when :data:`POISON_OUTPUTS` is on."""
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def skipped(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty tensor in the slot of a gradient nobody asked for. Why fresh: a
    ``torch.library`` custom op may not return one tensor twice (it raises), so one shared
    empty tensor for two skipped gradients would fail."""
    return like.new_empty(0)


def not_a_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that is not a view. Why: a ``torch.library`` custom op copies any
    output that is a view, while a detached alias of a fresh intermediate is neither a view
    nor aliased with the op's inputs."""
    return t.detach() if t._is_view() else t


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout outputs follow: channels_last only for a genuinely channels_last ``x``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def new_output(shape: Sequence[int], like: torch.Tensor, dtype: torch.dtype | None = None, memory_format=None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device (poisoned under :data:`POISON_OUTPUTS`),
    in ``like``'s dtype and layout unless given."""
    fmt = memory_format_of(like) if memory_format is None else memory_format
    return poison(torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=fmt))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the PyTorch paths compute in: fp32 for fp16/bf16 (half-precision math on the
    CPU is slow and loses precision in long sums), ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def int_pairs(stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    """Conv geometry as the ``SymInt[]`` lists a custom op takes (a custom op has no string
    padding such as ``'same'``)."""
    from .._checks import pair

    if isinstance(padding, str):
        raise TypeError(f"padding must be an int or a pair of ints for the fused backends, got {padding!r}")
    return (
        list(pair(stride, "stride", minimum=1)),
        list(pair(padding, "padding")),
        list(pair(dilation, "dilation", minimum=1)),
    )


def _tuples(args: tuple) -> list:
    """A custom op hands ``SymInt[]``/``bool[]`` arguments over as lists: tuples for the backends."""
    return [tuple(a) if isinstance(a, list) else a for a in args]


def define_op(
    name: str,
    schema: str,
    forward: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
    backward_schema: str,
    backward: Callable[..., tuple[torch.Tensor, ...]],
    backward_fake: Callable[..., tuple[torch.Tensor, ...]],
    *,
    saved: int,
    grad_of: Sequence[int],
    flags: Callable[[tuple[bool, ...]], tuple],
) -> Callable[..., torch.Tensor]:
    """Register ``dynconv::<name>`` and ``dynconv::<name>_backward``; return the forward op.

    * ``schema``: the forward op's inputs (``saved`` tensors first, then the other
      arguments) and its one output; ``forward``/``fake`` take those inputs.
    * ``backward_schema``: ``(grad, *the forward's inputs, *flags)`` to one gradient per
      position in ``grad_of`` (the forward inputs they belong to); ``backward`` returns
      them, :func:`skipped` for the ones the flags did not ask for.
    * ``flags(needs_input_grad)``: the extra backward arguments saying which gradients are
      wanted.

    Idempotent per ``name``, so that a re-imported module does not redefine the op.
    """
    if name in _DEFINED:
        return _DEFINED[name]
    qual = f"dynconv::{name}"
    fwd_op = torch.library.custom_op(qual, lambda *a: forward(*_tuples(a)), mutates_args=(), schema=schema)
    fwd_op.register_fake(fake)
    bwd_op = torch.library.custom_op(
        qual + "_backward", lambda *a: tuple(backward(*_tuples(a))), mutates_args=(), schema=backward_schema
    )
    bwd_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:saved])
        ctx.arguments = inputs[saved:]

    def backward_rule(ctx, grad):
        need = ctx.needs_input_grad
        grads = bwd_op(grad, *ctx.saved_tensors, *ctx.arguments, *flags(need))
        out = [None] * len(need)
        for position, g in zip(grad_of, grads):
            out[position] = g if need[position] else None
        return tuple(out)

    fwd_op.register_autograd(backward_rule, setup_context=setup_context)
    _DEFINED[name] = fwd_op
    return fwd_op
