"""What the dynamic convolutions share (like ``torch.nn.modules.conv._ConvNd``): geometry and
its checks, the output size, autocast handling, expert initialisation, the arguments taken
from an ``nn.Conv2d`` when converting, and an ``extra_repr`` that prints non-defaults only."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Union

import torch
from torch import nn

from .._checks import conv_output_size, pair, positive_int

IntOrPair = Union[int, tuple[int, int]]


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """A conv's padding as ints ('valid' -> 0; 'same' when it is symmetric)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with an even receptive field {conv.kernel_size} is asymmetric; not supported")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)  # type: ignore[return-value]


def init_experts(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Initialise each expert ``weight[i]`` like the dense layer (``nn.Conv2d`` / ``nn.Linear``)
    of its shape, and ``bias`` (shared or per expert) with that layer's bound."""
    for expert in weight.data:
        nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight[0, 0].numel())  # fan-in of one expert
        nn.init.uniform_(bias, -bound, bound)


@functools.lru_cache(maxsize=None)
def _init_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _is_default(value: Any, default: Any) -> bool:
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(v == default for v in value)  # (1, 1) is the default 1
    return value == default and type(value) is type(default)


class DynamicConv2d(nn.Module):
    """Base of :class:`SwitchedConv2d`, :class:`CondConv2d` and :class:`Involution2d`.

    Subclasses call :meth:`_set_geometry` in ``__init__`` (checks and stores ``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``) and,
    in ``forward``, :meth:`_autocast` before running their op with autocast off. Nothing here
    runs per forward pass except :meth:`output_size` (where a layer needs it) and
    :meth:`_autocast`.
    """

    #: False where the op has no grouped form (``groups != 1`` raises, naming the value).
    supports_groups = True

    in_channels: int
    out_channels: int
    kernel_size: IntOrPair
    stride: IntOrPair
    padding: IntOrPair
    dilation: IntOrPair
    groups: int

    def _set_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair,
        padding: IntOrPair,
        dilation: IntOrPair,
        groups: int,
        *,
        square: bool = False,
    ) -> None:
        """Check and store the conv geometry. ``square``: one int per argument (a square
        kernel, as Involution2d's), stored as ints; otherwise ints or pairs, stored as pairs."""
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        size = positive_int if square else pair
        self.kernel_size = size(kernel_size, "kernel_size", minimum=1)
        self.stride = size(stride, "stride", minimum=1)
        self.padding = size(padding, "padding", minimum=0)
        self.dilation = size(dilation, "dilation", minimum=1)
        if isinstance(groups, bool) and not square:
            raise TypeError(
                f"groups must be an int, got {groups!r}: the argument after dilation is groups, as in "
                f"nn.Conv2d(in, out, kernel_size, stride, padding, dilation, groups, bias); pass bias by keyword"
            )
        self.groups = positive_int(groups, "groups")
        if not self.supports_groups and groups != 1:
            raise ValueError(f"{type(self).__name__} supports groups=1 only, got groups={groups}")
        if in_channels % groups or out_channels % groups:
            channels = (
                f"channels ({in_channels})" if square and in_channels == out_channels
                else f"in_channels ({in_channels}) and out_channels ({out_channels})"
            )
            raise ValueError(f"{channels} must be divisible by groups ({groups})")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of ``height x width``, as ``nn.Conv2d`` computes it."""
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if isinstance(k, int):  # square geometry stored as ints
            return conv_output_size(height, k, s, p, d), conv_output_size(width, k, s, p, d)
        return (
            conv_output_size(height, k[0], s[0], p[0], d[0]),
            conv_output_size(width, k[1], s[1], p[1], d[1]),
        )

    @staticmethod
    def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
        """``(x, *tensors)``, cast to the autocast dtype where autocast is on (``None`` stays).

        The ops run with autocast off, so the layer decides their dtype once: the input, the
        expert weights and the routing all in the autocast dtype (``routing_probabilities``
        computes the routing itself in at least fp32)."""
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return (x, *tensors)
        dtype = torch.get_autocast_dtype(device)
        return tuple(t if t is None else t.to(dtype) for t in (x, *tensors))

    @classmethod
    def _conv_arguments(cls, conv: nn.Conv2d) -> dict[str, Any]:
        """The constructor arguments that reproduce ``conv``'s geometry (for ``from_conv``)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not cls.supports_groups and conv.groups != 1:
            raise ValueError(f"{cls.__name__}.from_conv supports groups=1 only, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__}.from_conv supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        return dict(
            in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
            stride=conv.stride, padding=conv_padding(conv), dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
        )

    # -- repr ------------------------------------------------------------------------------
    def _repr_head(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"

    def _repr_options(self) -> dict[str, Any]:
        """The options ``extra_repr`` shows when they differ from the ``__init__`` default."""
        return {"padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "bias": getattr(self, "bias", None) is not None}

    def extra_repr(self) -> str:
        defaults = _init_defaults(type(self))
        parts = [self._repr_head()]
        for name, value in self._repr_options().items():
            if name not in defaults or not _is_default(value, defaults[name]):
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)
