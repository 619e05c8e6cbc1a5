"""``backend='triton'`` for the hard-routed switched conv: registration, with lazy kernels.

Why a separate light module: importing it must not import triton or decorate the kernels
(slow, and the decoration is when ``TRITON_INTERPRET`` is read), so the kernels live in
:mod:`._switched_triton_kernels` and are imported at the first launch. Importing this
module defines the ``dynconv::switched_conv2d_triton`` custom op and registers
``HARD_BACKENDS['triton']`` when triton is installed. Design, precision and determinism are
described in :mod:`._switched_triton_kernels`.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

from ._backend import triton_usable_on
from ._custom_ops import call_switched_op, define_switched_op
from .switched import HARD_BACKENDS

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _kernels():
    from . import _switched_triton_kernels

    return _switched_triton_kernels


def _check_device(x: torch.Tensor) -> None:
    if not triton_usable_on(x):
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and triton installed; "
            f"got a tensor on {x.device}"
        )


def triton_forward(x, weight, bias, index, gate, stride, padding, dilation, deterministic=False) -> torch.Tensor:
    """Fused forward kernel launch (no autograd)."""
    return _kernels().triton_forward(x, weight, bias, index, gate, stride, padding, dilation, deterministic)


def triton_backward(grad, x, weight, bias, index, gate, stride, padding, dilation, deterministic, needs):
    """Fused backward kernel launches: grads of ``x``, ``weight``, ``bias``, ``gate``."""
    return _kernels().triton_backward(grad, x, weight, bias, index, gate, stride, padding, dilation, deterministic, needs)


_triton_op = define_switched_op("triton", triton_forward, triton_backward)


def triton_switched_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    routing: tuple[torch.Tensor, torch.Tensor],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Hard-routed switched conv through the ``dynconv::switched_conv2d_triton`` custom op.

    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    _check_device(x)
    return call_switched_op(_triton_op, x, weight, bias, routing, stride, padding, dilation, deterministic)


if TRITON_INSTALLED:
    HARD_BACKENDS["triton"] = triton_switched_conv2d
