"""``cond_conv2d`` / ``cond_linear``: per-example kernels mixed from expert kernels.

``kernel_n = sum_i a_ni W_i`` and ``bias_n = sum_i a_ni b_i`` (CondConv, Yang et al. 2019;
Dynamic Convolution, Chen et al. 2020). The reference folds the batch into conv groups,
so the whole batch is one grouped convolution (no Python loop over examples).

Fast backends: two PyTorch paths that run on any device, ``'cpu'`` (:mod:`.cpu`: the
per-example kernels, one grouped conv over chunks of examples) and ``'experts'``
(:mod:`.experts`: every expert's conv as one dense conv, mixed by the routing weights), and
``'triton'`` (:mod:`.triton_launch`). All run as the custom op ``dynconv::cond_conv2d_fused``
(with ``..._backward``), defined here, whose ``impl`` argument names the backend.
``backend='auto'`` takes ``triton`` for CUDA tensors when triton is installed
(:mod:`dynconv.ops.dispatch`), else the PyTorch path that :func:`pytorch_backend` estimates
cheaper for the shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import conv_output_size, float_input, positive_int
from ..custom_op import define_op, int_pairs, memory_format_of, skipped
from ..dispatch import Backends

# ----------------------------------------------------------------------------- auto: which PyTorch path

# The cost model behind 'auto' off CUDA (or without triton), forward + backward, in
# multiply-adds (MACs) of a dense conv, per example:
#
# * ``cpu`` (per-example kernels): the dense conv's MACs (its grouped conv does as many), the
#   kernel mixing (4 E MACs per kernel element: mix forward and again backward, the experts'
#   and the routing weights' gradients), and memory traffic over the per-example kernels,
#   which on small maps dominates: each kernel serves only H_out * W_out pixels;
# * ``experts``: E dense convs, memory traffic over the stacked input (E x the input), and
#   over the E experts' weights once per call (a share of it per example).
#
# A forward alone costs about a third of each term (the mixing: a quarter), so one rule serves
# training and inference.
# With 3x3 kernels, C_in = C_out and a large batch (many channels: the stacking traffic is then
# small against the convs), ``experts`` wins below about (4 E + 650) / (3 (E - 1)) output
# pixels: E = 2: 219 (maps up to 14x14), E = 4: 74 (up to 8x8), E = 8: 32 (up to 5x5); of the
# ResNet-18 CIFAR stages, the 8x8 and 4x4 ones at E = 4, the 4x4 one at E = 8. Small batches
# keep per-example kernels longer: the experts' weight traffic is then shared by few examples
# (N128 C512 4x4: ``experts`` from 6 examples on at E = 4, from 18 at E = 8).

#: How many MACs moving one fp32 element through memory once costs (time-equivalent). Fit to
#: the ResNet-18 CIFAR benchmark (2-core VM, 2026-12-02, fwd+bwd, 4 experts, NCHW /
#: channels_last): the ``cpu`` backend's time beyond the dense conv's, per per-example kernel
#: element and pass (:data:`PER_EXAMPLE_KERNEL_PASSES`), is 33 / 53 dense-conv MAC-times at
#: N128 C128 16x16, 51 / 62 at C256 8x8 and 55 / 56 at C512 4x4. (Issue 12's first
#: measurements gave about 30 at 16x16 and 8x8; with 30 the 8x8 stage stayed on ``cpu`` at
#: 4.4-5.2x a dense conv where ``experts`` runs at 4.1x.)
ELEMENT_PASS_MACS = 50
#: Passes over the per-example kernels in the ``cpu`` backend, fwd+bwd: mix (write), oneDNN's
#: reorder (read, write), conv (read); backward: mix again (write), reorder (read, write),
#: input gradient (read), kernel gradient (write), its reorder back (read, write), the
#: experts' and the routing weights' gradient matmuls (read, read).
PER_EXAMPLE_KERNEL_PASSES = 13
#: Passes over the ``experts`` backend's stacked input, fwd+bwd: stack (write), conv (read);
#: backward: stack again (write), weight gradient (read), stacked input's gradient (write),
#: input gradient (read), routing gradient (read, product write, read).
STACKED_INPUT_PASSES = 9
#: Passes over the E experts' weights per ``experts`` call, fwd+bwd, whatever the batch:
#: stacking them (read, write), oneDNN's reorder (read, write), conv (read); backward: stacking
#: (read, write), reorder (read, write), input gradient (read), weight gradient (write), its
#: reorder back (read, write), unstacking it (read, write).
EXPERT_WEIGHT_PASSES = 15


def path_costs(
    in_channels: int, out_channels: int, kernel_taps: int, groups: int, experts: int, in_pixels: int, out_pixels: int,
    batch: int | None = None,
) -> dict[str, float]:
    """Estimated cost per example of a forward + backward in each PyTorch path, in MACs of a
    dense conv (the model above): ``{'cpu': ..., 'experts': ...}``. ``kernel_taps`` is
    ``kH * kW``; pixels are ``H * W`` of the input and of the output; ``batch``: the examples
    that share the experts' per-call weight traffic (``None``: a batch large enough that its
    share vanishes)."""
    kernel_elements = out_channels * (in_channels // groups) * kernel_taps
    dense = 3 * out_pixels * kernel_elements  # forward, input gradient, weight gradient
    per_example = dense + kernel_elements * (4 * experts + ELEMENT_PASS_MACS * PER_EXAMPLE_KERNEL_PASSES)
    stacked = experts * dense + ELEMENT_PASS_MACS * STACKED_INPUT_PASSES * experts * in_channels * in_pixels
    if batch:
        stacked += ELEMENT_PASS_MACS * EXPERT_WEIGHT_PASSES * experts * kernel_elements / batch
    return {"cpu": per_example, "experts": stacked}


def pytorch_backend(
    x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], groups: int,
) -> str:
    """``'experts'`` where :func:`path_costs` estimates it cheaper than ``'cpu'`` for this
    call, else ``'cpu'``: ``'auto'``'s choice for CPU tensors (and CUDA ones without triton).
    Geometry arguments are int pairs. A symbolic batch size (``torch.compile`` with dynamic
    shapes, ``torch.export``) counts as a large batch, so that the choice adds no guard on it."""
    ho = conv_output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
    batch = x.shape[0]
    costs = path_costs(
        x.shape[1], weight.shape[1], weight.shape[3] * weight.shape[4], groups, weight.shape[0],
        x.shape[2] * x.shape[3], ho * wo, batch=None if isinstance(batch, torch.SymInt) else batch,
    )
    return "experts" if costs["experts"] < costs["cpu"] else "cpu"


#: The fast backends of ``cond_conv2d``; off CUDA (or without triton) ``'auto'`` asks
#: :func:`pytorch_backend`.
BACKENDS = Backends(
    "cond_conv2d", __package__, {"cpu": ".cpu", "experts": ".experts", "triton": ".triton_launch"},
    portable=pytorch_backend,
)


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


# ----------------------------------------------------------------------------- custom op

_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor routing_weights, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, SymInt groups, str impl) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor routing_weights, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, SymInt groups, str impl, bool need_input, bool need_params) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _forward(x, weight, bias, routing_weights, stride, padding, dilation, groups, impl):
    return BACKENDS.module(impl).forward(x, weight, bias, routing_weights, stride, padding, dilation, groups)


def _backward(grad, x, weight, bias, routing_weights, stride, padding, dilation, groups, impl, need_input, need_params):
    return BACKENDS.module(impl).backward(
        grad, x, weight, bias, routing_weights, stride, padding, dilation, groups, need_input, need_params
    )


def _fake(x, weight, bias, routing_weights, stride, padding, dilation, groups, impl):
    ho = conv_output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[1], ho, wo)).contiguous(memory_format=memory_format_of(x))


def _backward_fake(grad, x, weight, bias, routing_weights, stride, padding, dilation, groups, impl, need_input, need_params):
    gx = x.new_empty(x.shape).contiguous(memory_format=memory_format_of(x)) if need_input else skipped(x)
    if not need_params:
        return gx, skipped(x), skipped(x), skipped(x)
    gb = bias.new_empty(bias.shape) if bias is not None else skipped(x)
    return gx, weight.new_empty(weight.shape), gb, routing_weights.new_empty(routing_weights.shape)


_OP = define_op(
    "cond_conv2d_fused",
    _SCHEMA,
    _forward,
    _fake,
    _BACKWARD_SCHEMA,
    _backward,
    _backward_fake,
    saved=4,
    grad_of=(0, 1, 2, 3),
    flags=lambda need: (need[0], need[1] or need[2] or need[3]),
)


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
    """Conditionally parameterised convolution: example ``n`` is convolved with the kernel
    ``sum_i routing_weights[n, i] * weight[i]`` (and the bias mixed the same way).

    Args:
        x: the input.
        weight: the expert kernels.
        bias: per-expert biases, or ``None``.
        routing_weights: each example's expert weights.
        stride, padding, dilation, groups: as ``F.conv2d``.
        backend: ``'auto'`` (see :mod:`dynconv.ops.dispatch`: triton for CUDA tensors, else
            the cheaper PyTorch path for the shape, :func:`pytorch_backend`), ``'reference'``,
            ``'cpu'`` (per-example kernels: the cheaper on large maps), ``'experts'`` (every
            expert's conv as one dense conv, ``E`` times its FLOPs: the cheaper on small maps
            with many channels), ``'triton'``.

    Shape:
        - ``x``: ``(N, in_channels, H, W)``; ``weight``: ``(num_experts, out_channels,
          in_channels / groups, kH, kW)``; ``bias``: ``(num_experts, out_channels)``;
          ``routing_weights``: ``(N, num_experts)``.
        - Output: ``(N, out_channels, H_out, W_out)``, as ``F.conv2d``.

    Example::

        >>> x, weight = torch.randn(2, 4, 8, 8), torch.randn(3, 6, 4, 3, 3)
        >>> cond_conv2d(x, weight, None, torch.rand(2, 3), padding=1).shape
        torch.Size([2, 6, 8, 8])
    """
    BACKENDS.check(backend)
    _check(x, weight, bias, routing_weights, groups)
    if backend == "reference":
        return reference_cond_conv2d(x, weight, bias, routing_weights, stride, padding, dilation, groups)
    geometry = int_pairs(stride, padding, dilation)
    backend = BACKENDS.choose(backend, x, weight, *geometry, groups)
    return _OP(x, weight, bias, routing_weights, *geometry, groups, backend)


def cond_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing_weights: torch.Tensor) -> torch.Tensor:
    """``y_n = (sum_i a_ni W_i) x_n + sum_i a_ni b_i`` with ``a = routing_weights``.

    Shape:
        ``x``: ``(N, in_features)``; ``weight``: ``(num_experts, out_features, in_features)``;
        ``bias``: ``(num_experts, out_features)`` or ``None``; ``routing_weights``:
        ``(N, num_experts)``; output: ``(N, out_features)``.

    Example::

        >>> cond_linear(torch.randn(2, 4), torch.randn(3, 6, 4), None, torch.rand(2, 3)).shape
        torch.Size([2, 6])
    """
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
