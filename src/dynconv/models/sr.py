"""Super-resolution networks: LR ``(N, 3, h, w)`` in [0, 1] -> SR ``(N, 3, h*s, w*s)``.

* ``sr_plain`` / ``sr_switched`` / ``sr_condconv`` / ``sr_involution``: one small net whose
  hidden 3x3 layers are a plain conv or a dynamic layer, so variants differ only in the
  operator (the demo compares them at matched FLOPs, see :func:`match_flops`).
* ``edsr_baseline``: EDSR's baseline (Lim et al. 2017), 16 residual blocks, 64 channels.
* ``rrdb``: ESRGAN's RRDBNet (Wang et al. 2018), the PSNR-oriented generator.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from .flops import count_parameters, flops_per_pixel
from .registry import build_model, check_layer_options, conv3x3, model_task, register_model

SCALES = (2, 3, 4)


def _scale(scale: int, model: str, allowed: tuple[int, ...] = SCALES) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in allowed:
        raise ValueError(f"model {model!r}: scale must be one of {allowed}, got {scale!r}")
    return scale


class ConvReLU(nn.Module):
    """A hidden layer (``conv`` then ReLU): the unit of conversion and of checkpointing."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if image is not None:
            return F.relu(self.conv(x, selector_input=image))
        return F.relu(self.conv(x))


def _sees_image(conv: nn.Module, image: torch.Tensor) -> bool:
    """A switched hidden layer whose selector takes as many channels as the LR image (and not
    its own input's) routes by the image: ``convert`` with ``selector_channels: 3`` in its
    options (staged training). The author's open question: should selectors see the image?"""
    from ..nn import SwitchedConv2d

    return (isinstance(conv, SwitchedConv2d) and conv.selector_channels == image.shape[1]
            and conv.selector_channels != conv.in_channels)


class SRNet(nn.Module):
    """``conv3x3(3->C) + ReLU``, ``num_layers - 2`` x (hidden 3x3 layer ``C->C`` + ReLU),
    ``conv3x3(C -> 3*s*s)``, ``PixelShuffle(s)``, plus the bicubic upsampling of the input
    (``F.interpolate(lr, scale_factor=s, mode='bicubic')``) added to the output, so the net
    learns the residual over bicubic. The input is centred (``lr - 0.5``) and the last conv
    starts small (x0.1, zero bias), so an untrained net is close to bicubic and trains fast.
    A switched hidden layer with ``selector_channels=3`` routes by the (centred) LR image
    instead of its own input.
    """

    def __init__(
        self, *, name: str, kind: str, scale: int, channels: int, num_layers: int, layer: Mapping[str, Any] | None
    ) -> None:
        super().__init__()
        self.scale = _scale(scale, name)
        channels = positive_int(channels, "channels")
        if positive_int(num_layers, "num_layers") < 2:
            raise ValueError(f"model {name!r}: num_layers must be >= 2 (head and tail convs), got {num_layers}")
        options = check_layer_options(kind, layer, name)
        self.kind = kind
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(
            *(ConvReLU(conv3x3(kind, channels, channels, options, bias=True)) for _ in range(num_layers - 2))
        )
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        with torch.no_grad():
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The hidden layers (conv + ReLU)."""
        return list(self.body)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        image = lr - 0.5
        x = F.relu(self.head(image))
        for layer in self.body:  # only a layer that routes by the image is handed it
            x = layer(x, image) if _sees_image(layer.conv, image) else layer(x)
        up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.shuffle(self.tail(x))


@register_model("sr_plain", task="super_resolution")
def sr_plain(scale: int = 2, channels: int = 64, num_layers: int = 5) -> SRNet:
    """The plain-conv SR net (see :class:`SRNet`)."""
    return SRNet(name="sr_plain", kind="conv", scale=scale, channels=channels, num_layers=num_layers, layer=None)


@register_model("sr_switched", task="super_resolution")
def sr_switched(
    scale: int = 2, channels: int = 64, num_layers: int = 5, layer: Mapping[str, Any] | None = None
) -> SRNet:
    """:class:`SRNet` with :class:`~dynconv.SwitchedConv2d` hidden layers (default breadth 8,
    1x1-conv selector on the layer's input, hard routing); ``layer``: its options."""
    return SRNet(
        name="sr_switched", kind="switched", scale=scale, channels=channels, num_layers=num_layers, layer=layer
    )


@register_model("sr_condconv", task="super_resolution")
def sr_condconv(
    scale: int = 2, channels: int = 64, num_layers: int = 5, layer: Mapping[str, Any] | None = None
) -> SRNet:
    """:class:`SRNet` with :class:`~dynconv.CondConv2d` hidden layers; ``layer``: ``num_experts``
    (default 8), ``routing`` (``sigmoid``: CondConv, ``softmax``: Dynamic Convolution), ``temperature``."""
    return SRNet(
        name="sr_condconv", kind="condconv", scale=scale, channels=channels, num_layers=num_layers, layer=layer
    )


@register_model("sr_involution", task="super_resolution")
def sr_involution(
    scale: int = 2, channels: int = 64, num_layers: int = 5, layer: Mapping[str, Any] | None = None
) -> SRNet:
    """:class:`SRNet` with :class:`~dynconv.Involution2d` hidden layers (3x3 kernels by default,
    the conv's footprint; ``groups`` default ``channels // 16``). Involution mixes no channels,
    so the hidden layers are far cheaper than a conv: at matched FLOPs it gets more channels."""
    return SRNet(
        name="sr_involution", kind="involution", scale=scale, channels=channels, num_layers=num_layers, layer=layer
    )


# -- EDSR baseline ----------------------------------------------------------------------------
class ResBlock(nn.Module):
    """EDSR residual block: conv -> ReLU -> conv, scaled by ``res_scale``, plus the input."""

    def __init__(self, channels: int, res_scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.conv2(F.relu(self.conv1(x)))


class EDSR(nn.Module):
    """EDSR: mean shift -> head conv -> residual blocks -> conv (+ global skip) -> pixel-shuffle
    upsampler (x2 steps for 2 and 4, one x3 step for 3; no activation) -> conv -> mean shift back.
    Inputs in [0, 1] (rgb_range 1), DIV2K mean, std 1, as in the reference code."""

    def __init__(self, scale: int, channels: int, num_blocks: int, res_scale: float) -> None:
        super().__init__()
        self.scale = _scale(scale, "edsr_baseline")
        channels = positive_int(channels, "channels")
        self.register_buffer("rgb_mean", torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        num_blocks = positive_int(num_blocks, "num_blocks")
        self.body = nn.Sequential(*(ResBlock(channels, res_scale) for _ in range(num_blocks)))
        self.body_tail = nn.Conv2d(channels, channels, 3, padding=1)
        steps = [2] * int(math.log2(scale)) if scale in (2, 4) else [3]
        up: list[nn.Module] = []
        for s in steps:
            up += [nn.Conv2d(channels, channels * s * s, 3, padding=1), nn.PixelShuffle(s)]
        self.upsample = nn.Sequential(*up)
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.body)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.head(lr - self.rgb_mean)
        x = x + self.body_tail(self.body(x))
        return self.tail(self.upsample(x)) + self.rgb_mean


@register_model("edsr_baseline", task="super_resolution")
def edsr_baseline(scale: int = 2, channels: int = 64, num_blocks: int = 16, res_scale: float = 1.0) -> EDSR:
    """EDSR-baseline (16 blocks, 64 channels, residual scale 1)."""
    return EDSR(scale, channels, num_blocks, res_scale)


# -- RRDB (ESRGAN) ----------------------------------------------------------------------------
def _scaled_kaiming(modules: list[nn.Module], scale: float) -> None:
    """ESRGAN's init: Kaiming normal (fan in) scaled by ``scale``, zero bias; stabilises deep
    residual-in-residual stacks."""
    for m in modules:
        for conv in m.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
                conv.weight.data.mul_(scale)
                if conv.bias is not None:
                    conv.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (growth ``gc``), LeakyReLU(0.2), output x0.2 + input."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, padding=1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, padding=1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, padding=1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)
        _scaled_kaiming([self], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, output x0.2 + input."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: conv -> ``nb`` RRDBs -> conv (+ skip) -> nearest x2 + conv + LReLU (twice)
    -> conv + LReLU -> conv. x4 as in ESRGAN; x2 pixel-unshuffles the input first (as BasicSR);
    x3 uses one nearest x3 step (not in the reference code)."""

    def __init__(self, scale: int, nf: int, nb: int, gc: int) -> None:
        super().__init__()
        self.scale = _scale(scale, "rrdb")
        nf, gc = positive_int(nf, "channels"), positive_int(gc, "growth_channels")
        self.unshuffle = 2 if scale == 2 else 1
        self.conv_first = nn.Conv2d(3 * self.unshuffle**2, nf, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(positive_int(nb, "num_blocks"))))
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        self.steps = [3] if scale == 3 else [2, 2]
        self.conv_up = nn.ModuleList(nn.Conv2d(nf, nf, 3, padding=1) for _ in self.steps)
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, 3, 3, padding=1)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.body)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        h, w = lr.shape[-2:]
        x = lr
        if self.unshuffle > 1:  # x2 unshuffles the input: pad odd sizes (replicate), crop the output back
            pad_h, pad_w = (-h) % self.unshuffle, (-w) % self.unshuffle
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            x = F.pixel_unshuffle(x, self.unshuffle)
        fea = self.conv_first(x)
        fea = fea + self.conv_body(self.body(fea))
        for step, conv in zip(self.steps, self.conv_up):
            fea = F.leaky_relu(conv(F.interpolate(fea, scale_factor=step, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(fea), 0.2))
        return out[..., : h * self.scale, : w * self.scale]


@register_model("rrdb", task="super_resolution")
def rrdb(scale: int = 4, channels: int = 64, num_blocks: int = 23, growth_channels: int = 32) -> RRDBNet:
    """ESRGAN's RRDBNet (nf=64, nb=23, gc=32), the PSNR-oriented model; ``num_blocks`` smaller for tests.
    Any LR size (x2 pads an odd size for its pixel unshuffle and crops the output back)."""
    return RRDBNet(scale, channels, num_blocks, growth_channels)


# -- matched FLOPs ----------------------------------------------------------------------------
def match_flops(
    name: str,
    target_flops_per_pixel: float,
    scale: int = 2,
    *,
    lr_size: int = 48,
    multiple: int | None = None,
    max_channels: int = 1024,
    **options: Any,
) -> dict[str, Any]:
    """Pick ``channels`` so that ``build_model(name, scale=scale, channels=c, **options)`` costs
    as close as possible to ``target_flops_per_pixel`` (see :mod:`dynconv.models.flops`).

    FLOPs grow monotonically with channels, so this searches (doubling, then bisection) over
    multiples of ``multiple`` (default 4, or a multiple of ``layer['groups']``), skipping counts
    that do not build (e.g. involution's default ``channels // 16`` groups not dividing them).
    ``lr_size``: the LR patch size the number is for (CondConv's per-example routing and
    mixing are spread over its pixels).
    Returns ``dict(channels, flops_per_pixel, params, relative_error)``.
    """
    if model_task(name) != "super_resolution":
        raise ValueError(f"name must be a super-resolution model, got {name!r} ({model_task(name)})")
    if not float(target_flops_per_pixel) > 0:
        raise ValueError(f"target_flops_per_pixel must be > 0, got {target_flops_per_pixel}")
    if "channels" in options:
        raise ValueError("options must not contain 'channels': it is what match_flops picks")
    if multiple is None:
        multiple = math.lcm(4, int((options.get("layer") or {}).get("groups", 1)))
    positive_int(multiple, "multiple")
    shape = (1, 3, lr_size, lr_size)
    limit = max(1, max_channels // multiple)  # channels are searched in units of `multiple`
    cache: dict[int, float | None] = {}
    errors: list[ValueError] = []

    def cost(units: int) -> float | None:  # None: these channels don't build (e.g. groups don't divide)
        if units not in cache:
            try:
                model = build_model(name, scale=scale, channels=units * multiple, **options)
            except ValueError as error:
                errors.append(error)
                cache[units] = None
            else:
                cache[units] = flops_per_pixel(model, shape)
        return cache[units]

    def at_or_above(units: int) -> tuple[int, float]:  # monotone in units: safe to bisect
        while units <= limit:
            value = cost(units)
            if value is not None:
                return units, value
            units += 1
        return limit + 1, math.inf

    # grow until the target is reached (never builds a net much bigger than needed), then bisect
    lo, hi = 1, 1
    while at_or_above(hi)[1] < target_flops_per_pixel:
        if hi >= limit:
            raise ValueError(
                f"target_flops_per_pixel {target_flops_per_pixel:.4g} is above {name} at max_channels={max_channels}; "
                "raise max_channels"
            )
        lo, hi = hi + 1, min(2 * hi, limit)
    while lo < hi:  # smallest units with cost >= target
        mid = (lo + hi) // 2
        if at_or_above(mid)[1] >= target_flops_per_pixel:
            hi = mid
        else:
            lo = mid + 1
    above = at_or_above(lo)[0]
    if above > limit:
        error = errors[-1]
        raise ValueError(f"{name}: no channel count up to {max_channels} builds with {options}: {error}") from error
    below = lo - 1
    while below >= 1 and cost(below) is None:
        below -= 1
    candidates = [above] + ([below] if below >= 1 else [])
    units = min(candidates, key=lambda u: abs(cost(u) - target_flops_per_pixel))
    channels, flops = units * multiple, cost(units)
    params = count_parameters(build_model(name, scale=scale, channels=channels, **options))
    return {
        "channels": channels,
        "flops_per_pixel": flops,
        "params": params,
        "relative_error": flops / target_flops_per_pixel - 1.0,
    }
