"""Involution2d (Li et al., CVPR 2021): a kernel generated per pixel, shared across a group's channels."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.involution import BACKENDS as INVOLUTION_BACKENDS
from .._checks import choice, float_input, positive_int
from .base import DynamicConv2d


class Involution2d(DynamicConv2d):
    """Involution: a ``K x K`` kernel generated per output pixel, shared by a group's channels.

    For each output pixel, a kernel per group is generated from that pixel's features
    (avg-pool, ceil mode, for stride > 1 -> 1x1 conv to ``channels / reduction`` -> BN -> ReLU
    -> 1x1 conv to ``K*K*groups``) and applied to the pixel's ``K x K`` neighbourhood of
    every channel in the group. Spatial size is kept ('same' padding) up to the stride.
    Involution keeps the channel count, so it takes ``channels``, not ``nn.Conv2d``'s
    ``(in_channels, out_channels)``; :func:`dynconv.create_conv2d` builds it from conv-shaped
    arguments (``create_conv2d('involution', c, c, k)``). ``in_channels`` and
    ``out_channels`` are both ``channels``.

    Args:
        channels: input and output channels.
        kernel_size: ``K`` (square kernels only).
        stride: the output is the input's size divided by ``stride`` (rounded up).
        groups: channel groups sharing a kernel (default ``max(1, channels // 16)``).
        reduction: channel reduction of the kernel-generating branch.
        dilation: dilation of the ``K x K`` neighbourhood.
        backend: the :func:`dynconv.ops.involution2d` backend (``'auto'``, ``'reference'``,
            ``'cpu'``, ``'triton'``).

    Shape:
        - Input: ``(N, channels, H, W)``.
        - Output: ``(N, channels, H_out, W_out)`` (:meth:`output_size`); for odd
          ``kernel_size`` ``H_out = ceil(H / stride)``.

    Example::

        >>> layer = Involution2d(32, kernel_size=7, groups=2)
        >>> layer(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        groups: int | None = None,
        reduction: int = 4,
        *,
        dilation: int = 1,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.channels = positive_int(channels, "channels")
        dilation = positive_int(dilation, "dilation")
        padding = dilation * (positive_int(kernel_size, "kernel_size") - 1) // 2
        if groups is None:
            groups = max(1, channels // 16)
        self._set_geometry(channels, channels, kernel_size, stride, padding, dilation, groups, square=True)
        self.reduction = positive_int(reduction, "reduction")
        self.backend = choice(backend, "backend", INVOLUTION_BACKENDS.names)
        hidden = max(1, channels // self.reduction)
        self.pool = nn.AvgPool2d(self.stride, self.stride, ceil_mode=True) if self.stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False, **factory),
            nn.BatchNorm2d(hidden, **factory),
            nn.ReLU(inplace=True),
        )
        self.span = nn.Conv2d(hidden, self.kernel_size**2 * self.groups, 1, **factory)

    def _repr_head(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}"

    def _repr_options(self) -> dict:
        return {"groups": self.groups, "reduction": self.reduction, "dilation": self.dilation, "backend": self.backend}

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The generated kernels, ``(N, groups, K*K, H_out, W_out)``."""
        k = self.span(self.reduce(self.pool(x)))
        return k.view(k.shape[0], self.groups, self.kernel_size**2, k.shape[2], k.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_input(x, "x", channels=self.channels)
        x, kernel = self._autocast(x, self.kernel(x))
        with torch.autocast(x.device.type, enabled=False):
            return ops.involution2d(
                x, kernel.to(x.dtype), self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.backend
            )
