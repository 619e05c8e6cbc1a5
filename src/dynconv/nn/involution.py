"""Involution2d (Li et al., CVPR 2021): a kernel generated per pixel, shared across a group's channels."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._backend import MIXTURE_BACKENDS
from .._checks import choice, float_input, positive_int


class Involution2d(nn.Module):
    """For each output pixel, a ``K x K`` kernel per group is generated from that pixel's
    features (avg-pool, ceil mode, for stride > 1 -> 1x1 conv to ``channels / reduction`` -> BN -> ReLU
    -> 1x1 conv to ``K*K*groups``) and applied to the pixel's ``K x K`` neighbourhood of
    every channel in the group. Spatial size is kept ('same' padding) up to the stride.
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
        self.kernel_size = positive_int(kernel_size, "kernel_size")
        self.stride = positive_int(stride, "stride")
        self.dilation = positive_int(dilation, "dilation")
        self.groups = positive_int(groups if groups is not None else max(1, channels // 16), "groups")
        if channels % self.groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({self.groups})")
        self.reduction = positive_int(reduction, "reduction")
        self.padding = self.dilation * (self.kernel_size - 1) // 2
        self.backend = choice(backend, "backend", MIXTURE_BACKENDS)
        hidden = max(1, channels // self.reduction)
        self.pool = nn.AvgPool2d(self.stride, self.stride, ceil_mode=True) if self.stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False, **factory),
            nn.BatchNorm2d(hidden, **factory),
            nn.ReLU(inplace=True),
        )
        self.span = nn.Conv2d(hidden, self.kernel_size**2 * self.groups, 1, **factory)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}, "
            f"reduction={self.reduction}, dilation={self.dilation}"
        )

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The generated kernels, ``(N, groups, K*K, H_out, W_out)``."""
        k = self.span(self.reduce(self.pool(x)))
        return k.view(k.shape[0], self.groups, self.kernel_size**2, k.shape[2], k.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_input(x, "x", channels=self.channels)
        kernel = self.kernel(x)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, kernel = x.to(dtype), kernel.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return ops.involution2d(
                x, kernel.to(x.dtype), self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.backend
            )
