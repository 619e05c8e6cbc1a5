"""``switched_conv2d``: a convolution with ``breadth`` kernels, one (or a soft mix) per output pixel.

Two routing forms:

* weights ``(N, breadth, H_out, W_out)`` (soft probabilities, or a one-hot):
  ``y = sum_e s_e * (conv(x, weight[e]) + bias)``;
* a pair ``(index, gate)`` with ``index`` ``(N, H_out, W_out)`` int64 and ``gate``
  ``(N, H_out, W_out)`` float: ``y = gate * (conv(x, weight[index]) + bias)`` per pixel.

The ``reference`` backend computes every expert densely and is the ground truth the fast
backends are tested against.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from .._checks import conv_output_size, float_input, pair
from ._backend import SWITCHED_BACKENDS, check_backend

Routing = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
IndexGate = tuple[torch.Tensor, torch.Tensor]

# name -> implementation for the (index, gate) form; fast backends register here.
HARD_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {}


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


def _default_hard_backend(x: torch.Tensor) -> str:
    from ._backend import triton_available

    if x.is_cuda and "triton" in HARD_BACKENDS and triton_available():
        return "triton"
    if "gather" in HARD_BACKENDS:
        return "gather"
    return "reference"


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

    ``backend``: ``'auto'`` (triton on CUDA, else gather, for the ``(index, gate)`` form;
    soft weights always use the reference), ``'reference'``, ``'gather'``, ``'triton'``.
    """
    check_backend(backend, SWITCHED_BACKENDS)
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
    if backend == "auto":
        backend = _default_hard_backend(x)
    if backend == "reference":
        return reference_switched_conv2d(x, weight, bias, routing, stride, padding, dilation)
    if backend not in HARD_BACKENDS:
        raise ValueError(f"backend {backend!r} is not available here; available: {('reference', *HARD_BACKENDS)}")
    return HARD_BACKENDS[backend](x, weight, bias, routing, stride, padding, dilation)
