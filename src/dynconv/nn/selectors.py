"""Selector networks: map a feature map to per-pixel expert logits for a switched conv.

Built-in selectors are registered by name in :data:`SELECTORS` (what ``SwitchedConv2d(selector=
'...')``, ``convert(..., selector='...')`` and a config's ``convert.selector`` accept):

- ``'conv1x1'``: one 1x1 conv to ``breadth`` logits (routing by the pixel's own features);
- ``'lambda'``: 1x1 conv -> BN -> ReLU -> lambda layer -> BN -> ReLU -> 1x1 conv (:class:`LambdaSelector`);
- ``'lambda_then_conv1x1'``: a lambda layer on the input, then a 1x1 conv to the logits, nothing
  else (:class:`LambdaThenConv1x1Selector`).

Each builder is ``(in_channels, breadth, stride, **options) -> nn.Module`` returning
``(N, breadth, H_out, W_out)`` logits for an input already aligned to the output grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from ..registry import Registry

#: selector name -> builder ``(in_channels, breadth, stride, **options) -> nn.Module``
SELECTORS = Registry("selector", positional=("in_channels", "breadth", "stride"))


class LambdaLayer(nn.Module):
    """Lambda layer (Bello, ICLR 2021) with content and local positional lambdas.

    Models long-range context (the content lambda summarises the whole map) and local
    structure (a ``context x context`` positional lambda) at linear cost, which lets the
    selector route by more than the pixel's own features.
    """

    def __init__(self, channels: int, *, heads: int = 4, key_dim: int = 16, context: int = 7) -> None:
        super().__init__()
        self.channels = positive_int(channels, "channels")
        self.heads = positive_int(heads, "heads")
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        if context % 2 != 1:
            raise ValueError(f"context must be odd, got {context}")
        self.key_dim = positive_int(key_dim, "key_dim")
        self.value_dim = channels // heads
        self.context = context
        self.to_q = nn.Conv2d(channels, key_dim * heads, 1, bias=False)
        self.to_k = nn.Conv2d(channels, key_dim, 1, bias=False)
        self.to_v = nn.Conv2d(channels, self.value_dim, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(key_dim * heads)
        self.norm_v = nn.BatchNorm2d(self.value_dim)
        self.position = nn.Conv3d(1, key_dim, (1, context, context), padding=(0, context // 2, context // 2))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, key_dim={self.key_dim}, context={self.context}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = self.norm_q(self.to_q(x)).view(n, self.heads, self.key_dim, h * w)
        k = self.to_k(x).view(n, self.key_dim, h * w).softmax(dim=-1)
        v = self.norm_v(self.to_v(x))
        content = torch.einsum("bkm,bvm->bkv", k, v.flatten(2))
        y = torch.einsum("bhkn,bkv->bhvn", q, content)
        positional = self.position(v.unsqueeze(1)).flatten(3)  # (n, key_dim, value_dim, h*w)
        y = y + torch.einsum("bhkn,bkvn->bhvn", q, positional)
        return y.reshape(n, self.heads * self.value_dim, h, w)


class LambdaSelector(nn.Sequential):
    """1x1 conv -> BN -> ReLU -> lambda layer -> BN -> ReLU -> 1x1 conv to ``breadth`` logits."""

    def __init__(self, in_channels: int, breadth: int, stride: tuple[int, int] = (1, 1), hidden: int | None = None) -> None:
        if hidden is None:
            hidden = min(64, max(16, 4 * math.ceil(in_channels / 4)))
        super().__init__(
            nn.Conv2d(in_channels, hidden, 1, stride=stride, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            LambdaLayer(hidden, heads=4, key_dim=16, context=7),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, breadth, 1),
        )


class LambdaThenConv1x1Selector(nn.Sequential):
    """A lambda layer on the selector input, then a 1x1 conv to ``breadth`` logits.

    Exactly "a lambda layer followed by a 1x1 conv", the selector the switched-conv VQ-VAE claim
    names, with no projection, normalisation or activation around the lambda layer (unlike
    :class:`LambdaSelector`). The lambda layer runs at the input's resolution and keeps its
    ``in_channels`` (which ``heads`` must divide); the 1x1 conv carries the stride.
    """

    def __init__(self, in_channels: int, breadth: int, stride: tuple[int, int] = (1, 1), *, heads: int = 4,
                 key_dim: int = 16, context: int = 7) -> None:
        super().__init__(
            LambdaLayer(in_channels, heads=heads, key_dim=key_dim, context=context),
            nn.Conv2d(in_channels, positive_int(breadth, "breadth"), 1, stride=stride),
        )


@SELECTORS.register("conv1x1")
def conv1x1_selector(in_channels: int, breadth: int, stride: tuple[int, int] = (1, 1)) -> nn.Conv2d:
    """One 1x1 conv to ``breadth`` logits."""
    return nn.Conv2d(in_channels, breadth, 1, stride=stride)


SELECTORS.register("lambda", LambdaSelector)
SELECTORS.register("lambda_then_conv1x1", LambdaThenConv1x1Selector)


def build_selector(name: str, in_channels: int, breadth: int, stride: tuple[int, int]) -> nn.Module:
    """The registered selector ``name`` (:data:`SELECTORS`) with its default options."""
    if name not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS.names()} or an nn.Module, got {name!r}")
    return SELECTORS.build(name, in_channels, breadth, stride)


def align_to_output_grid(
    x: torch.Tensor,
    output_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Pad or crop ``x`` so that a stride-``stride`` 1x1 conv samples it at the centre of each
    output pixel's receptive field and yields exactly ``output_size``.

    For 'same'-padded convs this is the identity; for e.g. ``padding=0`` it crops the border
    the conv cannot centre on.
    """
    pads = []
    for dim, (size, out, k, s, p, d) in enumerate(
        zip(x.shape[2:], output_size, kernel_size, stride, padding, dilation)
    ):
        before = p - (d * (k - 1)) // 2
        after = (out - 1) * s + 1 - size - before
        pads.append((before, after))
    if all(b == 0 and a <= 0 and a > -stride[i] for i, (b, a) in enumerate(pads)):
        return x  # a strided 1x1 conv already yields output_size
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))
