"""``involution2d``: a per-pixel K x K kernel, shared by the channels of a group (Li et al. 2021).

``out[n, c, i, j] = sum_{a,b} kernel[n, g(c), a*K + b, i, j] * x[n, c, i*s - p + a*d, j*s - p + b*d]``
with ``g(c) = c // (C / groups)``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import conv_output_size, float_input, pair, positive_int
from ._backend import auto_backend, check_backend

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {}


def _check(x, kernel, kernel_size, stride, padding, dilation, groups):
    float_input(x, "x")
    k = pair(kernel_size, "kernel_size", minimum=1)
    s, p, d = pair(stride, "stride", minimum=1), pair(padding, "padding"), pair(dilation, "dilation", minimum=1)
    groups = positive_int(groups, "groups")
    if x.shape[1] % groups:
        raise ValueError(f"channels of x ({x.shape[1]}) must be divisible by groups ({groups})")
    h_out = conv_output_size(x.shape[2], k[0], s[0], p[0], d[0])
    w_out = conv_output_size(x.shape[3], k[1], s[1], p[1], d[1])
    expected = (x.shape[0], groups, k[0] * k[1], h_out, w_out)
    if tuple(kernel.shape) != expected:
        raise ValueError(f"kernel must have shape (N, groups, K*K, H_out, W_out) = {expected}, got {tuple(kernel.shape)}")
    return k, s, p, d


def reference_involution2d(x, kernel, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    n, c = x.shape[:2]
    _, _, kk, h_out, w_out = kernel.shape
    patches = F.unfold(x, kernel_size, dilation, padding, stride)  # (N, C*K*K, L)
    patches = patches.view(n, groups, c // groups, kk, h_out, w_out)
    return (patches * kernel.unsqueeze(2)).sum(3).reshape(n, c, h_out, w_out)


def involution2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply per-pixel kernels ``kernel`` ``(N, groups, K*K, H_out, W_out)`` to ``x`` ``(N, C, H, W)``."""
    check_backend(backend, ("auto", "reference", *BACKENDS))
    k, s, p, d = _check(x, kernel, kernel_size, stride, padding, dilation, groups)
    if backend == "auto":
        backend = auto_backend(x, BACKENDS)
    if backend == "reference":
        return reference_involution2d(x, kernel, k, s, p, d, groups)
    return BACKENDS[backend](x, kernel, k, s, p, d, groups)
