"""``switched_conv2d``: a convolution with ``breadth`` kernels, one (or a soft mix) per output pixel.

Two routing forms:

* weights ``(N, breadth, H_out, W_out)`` (soft probabilities, or a one-hot):
  ``y = sum_e s_e * (conv(x, weight[e]) + bias)``;
* a pair ``(index, gate)`` with ``index`` ``(N, H_out, W_out)`` int64 and ``gate``
  ``(N, H_out, W_out)`` float: ``y = gate * (conv(x, weight[index]) + bias)`` per pixel.

Backends: ``'reference'`` (here) computes every expert densely and is the ground truth the
fast ones are tested against. The fast ones take the ``(index, gate)`` form and do the FLOPs
of one dense conv: ``'gather'`` (:mod:`.gather`, PyTorch, any device) and ``'triton'``
(:mod:`.triton_launch`, fused kernels). Each runs as the custom op
``dynconv::switched_conv2d_<backend>`` (with ``..._backward``), defined here.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from ..._checks import conv_output_size, float_input, pair
from ..custom_op import define_op, int_pairs, memory_format_of, skipped
from ..dispatch import Backends

Routing = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
IndexGate = tuple[torch.Tensor, torch.Tensor]

#: The fast backends of the ``(index, gate)`` form.
BACKENDS = Backends("switched_conv2d", __package__, {"gather": ".gather", "triton": ".triton_launch"}, portable="gather")


def _check_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 5:
        raise ValueError(
            f"weight must be 5-D (breadth, out_channels, in_channels, kH, kW), got shape {tuple(weight.shape)}"
        )
    float_input(x, "x", channels=weight.shape[2])
    if bias is not None and tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(f"bias must have shape ({weight.shape[1]},), got {tuple(bias.shape)}")


def output_size(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    s, p, d = pair(stride, "stride", minimum=1), pair(padding, "padding"), pair(dilation, "dilation", minimum=1)
    return (
        conv_output_size(x.shape[2], weight.shape[3], s[0], p[0], d[0]),
        conv_output_size(x.shape[3], weight.shape[4], s[1], p[1], d[1]),
    )


def check_routing(x: torch.Tensor, weight: torch.Tensor, routing: Routing, stride, padding, dilation) -> None:
    """Shape/dtype checks for ``routing`` against the conv's output size (no device sync)."""
    n, breadth = x.shape[0], weight.shape[0]
    h_out, w_out = output_size(x, weight, stride, padding, dilation)
    if isinstance(routing, (tuple, list)):
        if len(routing) != 2:
            raise ValueError(f"routing must be a tensor or an (index, gate) pair, got a sequence of {len(routing)}")
        index, gate = routing
        if index.dtype != torch.int64:
            raise TypeError(f"routing index must be int64, got {index.dtype}")
        if tuple(index.shape) != (n, h_out, w_out):
            raise ValueError(f"routing index must have shape {(n, h_out, w_out)}, got {tuple(index.shape)}")
        if not gate.is_floating_point():
            raise TypeError(f"routing gate must be a float tensor, got {gate.dtype}")
        if tuple(gate.shape) != (n, h_out, w_out):
            raise ValueError(f"routing gate must have shape {(n, h_out, w_out)}, got {tuple(gate.shape)}")
    elif isinstance(routing, torch.Tensor):
        if not routing.is_floating_point():
            raise TypeError(f"routing weights must be a float tensor, got {routing.dtype}")
        if tuple(routing.shape) != (n, breadth, h_out, w_out):
            raise ValueError(
                f"routing weights must have shape (N, breadth, H_out, W_out) = {(n, breadth, h_out, w_out)}, "
                f"got {tuple(routing.shape)}"
            )
    else:
        raise TypeError(f"routing must be a tensor or an (index, gate) pair, got {type(routing).__name__}")


def check_index_range(flat_index: torch.Tensor, breadth: int) -> None:
    """Refuse indices outside ``[0, breadth)`` (one device sync): the fast backends would pick
    a wrong expert or leave pixels unwritten."""
    if flat_index.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat_index))
        if lo < 0 or hi >= breadth:
            raise IndexError(f"routing index must lie in [0, {breadth}) (breadth), got values in [{lo}, {hi}]")


def sort_key_dtype(largest: int) -> torch.dtype:
    """The narrowest integer dtype holding ``0 .. largest``: the key the fast backends sort
    pixels by expert with (radix sort passes scale with the key's width; on the CPU a uint8
    key sorts ~5x faster than int64). ``largest`` is ``breadth - 1`` for a plain sort and
    ``breadth`` where the expert ids ``0 .. breadth`` are also searched for."""
    if largest <= torch.iinfo(torch.uint8).max:
        return torch.uint8
    if largest <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int64


def all_experts(x, weight, bias, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Every expert's conv output, ``(N, breadth, out_channels, H_out, W_out)`` (dense: breadth x the FLOPs)."""
    breadth, out_channels = weight.shape[:2]
    y = F.conv2d(x, weight.reshape(breadth * out_channels, *weight.shape[2:]), None, stride, padding, dilation)
    y = y.unflatten(1, (breadth, out_channels))
    if bias is not None:
        y = y + bias.view(1, 1, -1, 1, 1)
    return y


def reference_switched_conv2d(x, weight, bias, routing: Routing, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Dense ground truth: all experts computed, then mixed by the routing."""
    experts = all_experts(x, weight, bias, stride, padding, dilation)
    if isinstance(routing, torch.Tensor):
        return (routing.unsqueeze(2) * experts).sum(1)
    index, gate = routing
    n, _, out_channels, h_out, w_out = experts.shape
    chosen = experts.gather(1, index.view(n, 1, 1, h_out, w_out).expand(n, 1, out_channels, h_out, w_out))
    return chosen.squeeze(1) * gate.unsqueeze(1)


# ----------------------------------------------------------------------------- custom ops

_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor gate, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, bool deterministic) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor gate, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, bool deterministic, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)"
)


def output_dtype(x: torch.Tensor, gate: torch.Tensor) -> torch.dtype:
    """``gate * conv(x)`` promotes like the reference does."""
    return torch.promote_types(x.dtype, gate.dtype)


def _fake(x, weight, bias, index, gate, stride, padding, dilation, deterministic):
    n, h_out, w_out = index.shape
    return torch.empty(
        (n, weight.shape[1], h_out, w_out), dtype=output_dtype(x, gate), device=x.device, memory_format=memory_format_of(x)
    )


def _backward_fake(grad, x, weight, bias, index, gate, stride, padding, dilation, deterministic, needs):
    need_x, need_w, need_b, need_g = needs
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x)) if need_x else skipped(x)
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else skipped(x)
    gb = torch.empty((weight.shape[1],), dtype=weight.dtype, device=weight.device) if need_b else skipped(x)
    gg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_g else skipped(x)
    return gx, gw, gb, gg


def _define(backend: str):
    """``dynconv::switched_conv2d_<backend>``: the inputs are saved, gradients go to ``x``,
    ``weight``, ``bias`` and ``gate`` (``needs`` says which are wanted)."""
    return define_op(
        f"switched_conv2d_{backend}",
        _SCHEMA,
        lambda *args: BACKENDS.module(backend).forward(*args),
        _fake,
        _BACKWARD_SCHEMA,
        lambda *args: BACKENDS.module(backend).backward(*args),
        _backward_fake,
        saved=5,
        grad_of=(0, 1, 2, 4),
        flags=lambda need: ([need[0], need[1], need[2], need[4]],),
    )


_OPS = {backend: _define(backend) for backend in BACKENDS.modules}


def _call(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing: IndexGate,
    stride,
    padding,
    dilation,
    deterministic: bool | None,
) -> torch.Tensor:
    """Call ``dynconv::switched_conv2d_<backend>``; ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``."""
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    index, gate = routing
    return _OPS[backend](x, weight, bias, index, gate, *int_pairs(stride, padding, dilation), bool(deterministic))


def triton_switched_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing: IndexGate,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Hard-routed switched conv through ``dynconv::switched_conv2d_triton`` (no argument
    checks). ``deterministic=True`` (or ``None`` under ``torch.use_deterministic_algorithms``)
    takes the atomic-free, bitwise-reproducible backward."""
    return _call(BACKENDS.choose("triton", x), x, weight, bias, routing, stride, padding, dilation, deterministic)


def switched_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing: Routing,
    stride=1,
    padding=0,
    dilation=1,
    backend: str = "auto",
) -> torch.Tensor:
    """Switched convolution. See the module docstring for the routing forms.

    Args:
        x: the input.
        weight: the expert kernels.
        bias: shared by the experts, or ``None``.
        routing: soft weights ``(N, breadth, H_out, W_out)``, or hard routing as a pair
            ``(index, gate)`` (:func:`dynconv.nn.hard_index_gate` makes one from probabilities).
        stride, padding, dilation: as ``F.conv2d`` (ints or pairs).
        backend: ``'auto'`` (see :mod:`dynconv.ops.dispatch`: triton for CUDA tensors, else
            gather; soft routing weights always run on the reference), ``'reference'``,
            ``'gather'``, ``'triton'``.

    Shape:
        - ``x``: ``(N, in_channels, H, W)``; ``weight``: ``(breadth, out_channels, in_channels,
          kH, kW)``; ``bias``: ``(out_channels,)``.
        - ``index``: ``(N, H_out, W_out)`` int64, ``gate``: ``(N, H_out, W_out)`` float.
        - Output: ``(N, out_channels, H_out, W_out)``, ``H_out`` / ``W_out`` as ``F.conv2d``.

    Example::

        >>> x, weight = torch.randn(2, 4, 8, 8), torch.randn(3, 6, 4, 3, 3)
        >>> index = torch.randint(3, (2, 8, 8))
        >>> switched_conv2d(x, weight, None, (index, torch.ones(2, 8, 8)), padding=1).shape
        torch.Size([2, 6, 8, 8])
    """
    BACKENDS.check(backend)
    _check_weight(x, weight, bias)
    check_routing(x, weight, routing, stride, padding, dilation)
    if isinstance(routing, torch.Tensor):
        if backend not in ("auto", "reference"):
            raise ValueError(
                f"backend {backend!r} takes hard routing as an (index, gate) pair; soft routing weights "
                "run on backend='reference' (or 'auto')"
            )
        return reference_switched_conv2d(x, weight, bias, routing, stride, padding, dilation)
    routing = (routing[0], routing[1])
    backend = BACKENDS.choose(backend, x)
    if backend == "reference":
        return reference_switched_conv2d(x, weight, bias, routing, stride, padding, dilation)
    return _call(backend, x, weight, bias, routing, stride, padding, dilation, None)
