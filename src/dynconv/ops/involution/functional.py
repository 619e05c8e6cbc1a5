"""``involution2d``: a per-pixel K x K kernel, shared by the channels of a group (Li et al. 2021).

``out[n, c, i, j] = sum_{a,b} kernel[n, g(c), a*K + b, i, j] * x[n, c, i*s - p + a*d, j*s - p + b*d]``
with ``g(c) = c // (C / groups)``.

Fast backends: ``'cpu'`` (:mod:`.cpu`, PyTorch, any device) and ``'triton'``
(:mod:`.triton_launch`). Both run as the custom op ``dynconv::involution2d_fused`` (with
``..._backward``), defined here, whose ``impl`` argument names the backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import conv_output_size, float_input, pair, positive_int
from ..custom_op import define_op, int_pairs, memory_format_of, skipped
from ..dispatch import Backends

#: Output maps with fewer pixels per example than this run the ``reference`` (unfold) path
#: under ``'auto'`` off CUDA: at ResNet-18's CIFAR stages (K3, G = C/16, N128, 2 CPU threads)
#: the ``cpu`` backend is 1.5x faster than unfold at 8x8 (64 px) but 1.5x slower at 4x4 (16 px),
#: where its per-tap passes over the whole batch cost more than the small unfold buffer
#: (docs/performance.md).
UNFOLD_MAX_PIXELS = 32


def pytorch_backend(x: torch.Tensor, out_hw: tuple[int, int]) -> str:
    """``'auto'``'s choice for CPU tensors (and CUDA ones without triton): ``'cpu'``, or
    ``'reference'`` for output maps under :data:`UNFOLD_MAX_PIXELS` pixels. A symbolic map
    size (``torch.compile`` with dynamic shapes, ``torch.export``) picks ``'cpu'``, so that the
    choice adds no guard on it."""
    if any(isinstance(size, torch.SymInt) for size in out_hw):
        return "cpu"
    return "reference" if out_hw[0] * out_hw[1] < UNFOLD_MAX_PIXELS else "cpu"


#: The fast backends of ``involution2d``; off CUDA (or without triton) ``'auto'`` asks
#: :func:`pytorch_backend`.
BACKENDS = Backends("involution2d", __package__, {"cpu": ".cpu", "triton": ".triton_launch"}, portable=pytorch_backend)


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


# ----------------------------------------------------------------------------- custom op

_SCHEMA = (
    "(Tensor x, Tensor kernel, SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
    "SymInt groups, str impl) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor x, Tensor kernel, SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, SymInt groups, str impl, bool need_input, bool need_kernel) -> (Tensor, Tensor)"
)


def _forward(x, kernel, kernel_size, stride, padding, dilation, groups, impl):
    return BACKENDS.module(impl).forward(x, kernel, kernel_size, stride, padding, dilation, groups)


def _backward(grad, x, kernel, kernel_size, stride, padding, dilation, groups, impl, need_input, need_kernel):
    return BACKENDS.module(impl).backward(
        grad, x, kernel, kernel_size, stride, padding, dilation, groups, need_input, need_kernel
    )


def _fake(x, kernel, kernel_size, stride, padding, dilation, groups, impl):
    shape = (x.shape[0], x.shape[1], kernel.shape[3], kernel.shape[4])
    return x.new_empty(shape).contiguous(memory_format=memory_format_of(x))


def _backward_fake(grad, x, kernel, kernel_size, stride, padding, dilation, groups, impl, need_input, need_kernel):
    gx = x.new_empty(x.shape).contiguous(memory_format=memory_format_of(x)) if need_input else skipped(x)
    gk = kernel.new_empty(kernel.shape) if need_kernel else skipped(x)
    return gx, gk


_OP = define_op(
    "involution2d_fused",
    _SCHEMA,
    _forward,
    _fake,
    _BACKWARD_SCHEMA,
    _backward,
    _backward_fake,
    saved=2,
    grad_of=(0, 1),
    flags=lambda need: (need[0], need[1]),
)


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
    """Apply per-pixel kernels to ``x``: output pixel ``p`` of channel ``c`` is the ``K x K``
    neighbourhood of ``p`` in channel ``c`` weighted by ``kernel[:, c // (C / groups), :, p]``.

    Args:
        x: the input.
        kernel: the generated kernels, one per output pixel and group.
        kernel_size: ``K`` (an int or a pair).
        stride, padding, dilation: as ``F.conv2d``.
        groups: channel groups sharing a kernel.
        backend: ``'auto'`` (see :mod:`dynconv.ops.dispatch`: triton for CUDA tensors, else
            cpu, or reference on maps under :data:`UNFOLD_MAX_PIXELS` pixels:
            :func:`pytorch_backend`), ``'reference'``, ``'cpu'``, ``'triton'``.

    Shape:
        - ``x``: ``(N, C, H, W)``; ``kernel``: ``(N, groups, K*K, H_out, W_out)``.
        - Output: ``(N, C, H_out, W_out)``, ``H_out`` / ``W_out`` as ``F.conv2d``.

    Example::

        >>> x, kernel = torch.randn(2, 8, 6, 6), torch.randn(2, 2, 9, 6, 6)
        >>> involution2d(x, kernel, 3, padding=1, groups=2).shape
        torch.Size([2, 8, 6, 6])
    """
    BACKENDS.check(backend)
    k, s, p, d = _check(x, kernel, kernel_size, stride, padding, dilation, groups)
    backend = BACKENDS.choose(backend, x, tuple(kernel.shape[3:]))
    if backend == "reference":
        return reference_involution2d(x, kernel, k, s, p, d, groups)
    s, p, d = int_pairs(s, p, d)
    return _OP(x, kernel, list(k), s, p, d, groups, backend)
