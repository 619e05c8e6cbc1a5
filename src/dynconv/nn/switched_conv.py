"""SwitchedConv2d: a conv with ``breadth`` kernels and a selector that picks one per output pixel."""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._backend import SWITCHED_BACKENDS
from .._checks import choice, conv_output_size, float_input, pair, positive_int
from .routing import hard_index_gate
from .selectors import SELECTORS, align_to_output_grid, build_selector
from .switch_norm import SwitchNorm, statistics_frozen

IntOrPair = Union[int, tuple[int, int]]
ROUTINGS = ("hard", "soft")


class SwitchedConv2d(nn.Module):
    """Spatial mixture-of-experts convolution.

    ``weight`` is ``(breadth, out_channels, in_channels, kH, kW)``; ``bias`` ``(out_channels,)``
    is shared by all experts. A selector maps ``selector_input`` (default: the input) to
    ``breadth`` logits per output pixel -> softmax -> :class:`SwitchNorm` -> routing:
    ``'hard'`` uses the argmax expert (a dense conv's FLOPs, gradient ``grad / p`` to the
    selector), ``'soft'`` mixes all experts by their probabilities.

    ``selector`` is ``'conv1x1'``, ``'lambda'`` or any module returning
    ``(N, breadth, H_out, W_out)``; built-in selectors see the selector input sampled at the
    centre of each output pixel's receptive field. ``breadth=1`` is exactly an ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        bias: bool = True,
        *,
        breadth: int = 8,
        selector: str | nn.Module = "conv1x1",
        selector_channels: int | None = None,
        routing: str = "hard",
        switch_norm: bool = True,
        norm_buffer: int = 256,
        selector_dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = pair(padding, "padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.breadth = positive_int(breadth, "breadth")
        self.routing = choice(routing, "routing", ROUTINGS)
        self.backend = choice(backend, "backend", SWITCHED_BACKENDS)
        if not 0.0 <= float(selector_dropout) < 1.0:
            raise ValueError(f"selector_dropout must be in [0, 1), got {selector_dropout}")
        self.selector_dropout = float(selector_dropout)
        self.selector_channels = positive_int(selector_channels, "selector_channels") if selector_channels else in_channels
        self.weight = nn.Parameter(torch.empty(self.breadth, out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None

        # breadth 1 has nothing to choose: no selector, exactly an nn.Conv2d.
        self.selector: nn.Module | None = None
        self.selector_name = selector if isinstance(selector, str) else type(selector).__name__
        self.norm: SwitchNorm | None = None
        if self.breadth > 1:
            if isinstance(selector, nn.Module):
                self.selector = selector
            elif isinstance(selector, str):
                choice(selector, "selector", SELECTORS)
                self.selector = build_selector(selector, self.selector_channels, self.breadth, self.stride)
            else:
                raise TypeError(f"selector must be one of {SELECTORS} or an nn.Module, got {type(selector).__name__}")
            if switch_norm:
                self.norm = SwitchNorm(self.breadth, norm_buffer)
            if device is not None or dtype is not None:
                self.selector.to(**{k: v for k, v in factory.items() if v is not None})
        self._builtin_selector = isinstance(selector, str)
        # routing insight: EMA of the fraction of pixels each expert wins (not saved).
        self.register_buffer("recent_usage", torch.full((self.breadth,), 1.0 / self.breadth), persistent=False)
        self.register_buffer("recent_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self.usage_momentum = 0.02
        self.record_selection = False
        self.last_selection: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert like an ``nn.Conv2d`` of the same shape."""
        for expert in self.weight.data:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.norm is not None:
            self.norm.reset_buffer()

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"breadth={self.breadth}, routing={self.routing!r}"
        )
        if self.selector_dropout:
            s += f", selector_dropout={self.selector_dropout}"
        return s + f", backend={self.backend!r}"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (
            conv_output_size(height, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
            conv_output_size(width, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    # -- routing -----------------------------------------------------------------------
    def routing_probabilities(self, x: torch.Tensor, selector_input: torch.Tensor | None = None) -> torch.Tensor:
        """Selector logits -> (dropout) -> softmax -> SwitchNorm; ``(N, breadth, H_out, W_out)``."""
        out_size = self.output_size(x.shape[2], x.shape[3])
        if self.selector is None:
            return x.new_ones(x.shape[0], 1, *out_size)
        source = x if selector_input is None else selector_input
        if selector_input is not None:
            float_input(selector_input, "selector_input")
            if selector_input.shape[0] != x.shape[0] or selector_input.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"selector_input must have the batch size and spatial size of x {(x.shape[0], *x.shape[2:])}, "
                    f"got shape {tuple(selector_input.shape)}"
                )
        if self._builtin_selector:
            if source.shape[1] != self.selector_channels:
                name = "x" if selector_input is None else "selector_input"
                raise ValueError(
                    f"{name} must have {self.selector_channels} channels for the selector, got {source.shape[1]}"
                )
            source = align_to_output_grid(source, out_size, self.kernel_size, self.stride, self.padding, self.dilation)
        logits = self.selector(source)
        expected = (x.shape[0], self.breadth, *out_size)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"selector output must have shape (N, breadth, H_out, W_out) = {expected}, got {got}")
        if self.training and self.selector_dropout > 0:
            keep = torch.rand(logits.shape[0], self.breadth, 1, 1, device=logits.device) >= self.selector_dropout
            keep |= ~keep.any(dim=1, keepdim=True)  # at least one expert kept per example
            logits = logits * keep
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # routing decisions in at least fp32
        probs = torch.softmax(logits, dim=1)
        if self.norm is not None:
            probs = self.norm(probs)
        return probs

    def _record(self, index_or_probs: torch.Tensor, hard: bool) -> None:
        with torch.no_grad():
            if hard:
                flat = index_or_probs.flatten()  # scatter_add keeps a static shape (torch.compile)
                counts = torch.zeros(self.breadth, device=flat.device, dtype=torch.float32).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
            else:
                counts = index_or_probs.detach().float().sum(dim=(0, 2, 3))
            fractions = counts / counts.sum().clamp_min(1e-12)
            if self.training and not statistics_frozen():
                first = self.recent_steps == 0
                momentum = torch.where(first, torch.ones_like(fractions[0]), torch.full_like(fractions[0], self.usage_momentum))
                self.recent_usage.lerp_(fractions.to(self.recent_usage.dtype), momentum)
                self.recent_steps += 1
            if self.record_selection:
                self.last_selection = (
                    index_or_probs.detach().clone() if hard else index_or_probs.detach().argmax(dim=1)
                )

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, selector_input: torch.Tensor | None = None) -> torch.Tensor:
        float_input(x, "x", channels=self.in_channels)
        weight, bias = self.weight, self.bias
        if self.selector is None:  # breadth 1
            return F.conv2d(x, weight[0], bias, self.stride, self.padding, self.dilation)
        probs = self.routing_probabilities(x, selector_input)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if self.routing == "hard":
            index, gate = hard_index_gate(probs)
            self._record(index, hard=True)
            routing = (index, gate.to(x.dtype))
        else:
            self._record(probs, hard=False)
            routing = probs.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return ops.switched_conv2d(x, weight, bias, routing, self.stride, self.padding, self.dilation, self.backend)

    # -- conversion --------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, breadth: int = 8, **kwargs) -> "SwitchedConv2d":
        """A switched conv whose every expert is a copy of ``conv``'s kernel.

        Right after conversion the output equals ``conv``'s whatever the routing; training
        then lets the experts specialise (staged training).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SwitchedConv2d.from_conv supports groups=1 only, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SwitchedConv2d.from_conv supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        padding = conv_padding(conv)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            padding,
            conv.dilation,
            bias=conv.bias is not None,
            breadth=breadth,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer


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
