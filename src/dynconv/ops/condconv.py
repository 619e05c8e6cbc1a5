"""``cond_conv2d`` / ``cond_linear``: per-example kernels mixed from expert kernels.

``kernel_n = sum_i a_ni W_i`` and ``bias_n = sum_i a_ni b_i`` (CondConv, Yang et al. 2019;
Dynamic Convolution, Chen et al. 2020). The reference folds the batch into conv groups,
so the whole batch is one grouped convolution (no Python loop over examples).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import float_input, positive_int
from ._backend import auto_backend, check_backend

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {}


def _check(x, weight, bias, routing_weights, groups) -> None:
    if weight.dim() != 5:
        raise ValueError(
            f"weight must be 5-D (num_experts, out_channels, in_channels/groups, kH, kW), got {tuple(weight.shape)}"
        )
    groups = positive_int(groups, "groups")
    float_input(x, "x", channels=weight.shape[2] * groups)
    experts, out_channels = weight.shape[:2]
    if out_channels % groups:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    if tuple(routing_weights.shape) != (x.shape[0], experts):
        raise ValueError(
            f"routing_weights must have shape (N, num_experts) = {(x.shape[0], experts)}, got {tuple(routing_weights.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (experts, out_channels):
        raise ValueError(f"bias must have shape (num_experts, out_channels) = {(experts, out_channels)}, got {tuple(bias.shape)}")


def reference_cond_conv2d(x, weight, bias, routing_weights, stride=1, padding=0, dilation=1, groups=1):
    n = x.shape[0]
    experts, out_channels = weight.shape[:2]
    kernels = (routing_weights @ weight.reshape(experts, -1)).view(n * out_channels, *weight.shape[2:])
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernels, None, stride, padding, dilation, groups * n)
    y = y.view(n, out_channels, *y.shape[2:])
    if bias is not None:
        y = y + (routing_weights @ bias).view(n, out_channels, 1, 1)
    return y


def cond_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing_weights: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Conditionally parameterised convolution; ``routing_weights`` is ``(N, num_experts)``."""
    check_backend(backend, ("auto", "reference", *BACKENDS))
    _check(x, weight, bias, routing_weights, groups)
    if backend == "auto":
        backend = auto_backend(x, BACKENDS)
    if backend == "reference":
        return reference_cond_conv2d(x, weight, bias, routing_weights, stride, padding, dilation, groups)
    return BACKENDS[backend](x, weight, bias, routing_weights, stride, padding, dilation, groups)


def cond_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing_weights: torch.Tensor) -> torch.Tensor:
    """``y_n = (sum_i a_ni W_i) x_n + sum_i a_ni b_i`` for ``x`` ``(N, in)``, ``weight`` ``(E, out, in)``."""
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D (num_experts, out_features, in_features), got {tuple(weight.shape)}")
    float_input(x, "x", ndim=2, channels=weight.shape[2])
    experts, out_features = weight.shape[:2]
    if tuple(routing_weights.shape) != (x.shape[0], experts):
        raise ValueError(
            f"routing_weights must have shape (N, num_experts) = {(x.shape[0], experts)}, got {tuple(routing_weights.shape)}"
        )
    kernels = (routing_weights @ weight.reshape(experts, -1)).view(x.shape[0], out_features, -1)
    y = torch.bmm(kernels, x.unsqueeze(2)).squeeze(2)
    if bias is not None:
        y = y + routing_weights @ bias
    return y
