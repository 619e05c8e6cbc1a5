"""SwitchedConv2d: a conv with ``breadth`` kernels and a selector that picks one per output pixel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.switched import BACKENDS as SWITCHED_BACKENDS
from .._checks import choice, float_input, positive_int
from .base import DynamicConv2d, IntOrPair, init_experts
from .routing import hard_index_gate
from .selectors import SELECTORS, align_to_output_grid, build_selector
from .switch_norm import SwitchNorm, statistics_frozen

ROUTINGS = ("hard", "soft")


class SwitchedConv2d(DynamicConv2d):
    """Spatial mixture-of-experts convolution: ``breadth`` kernels, one chosen per output pixel.

    A selector maps ``selector_input`` (default: the input) to ``breadth`` logits per output
    pixel -> softmax -> :class:`SwitchNorm` -> routing: ``'hard'`` uses the argmax expert (a
    dense conv's FLOPs, gradient ``grad / p`` to the selector), ``'soft'`` mixes all experts
    by their probabilities. Built-in selectors see the selector input sampled at the centre
    of each output pixel's receptive field. ``breadth=1`` is exactly an ``nn.Conv2d``.

    The positional arguments are ``nn.Conv2d``'s: ``(in_channels, out_channels, kernel_size,
    stride, padding, dilation, groups, bias)``; the rest are keyword-only. Porting from the
    original implementation, whose signature is ``(in, out, kernel_size, breadth, stride)``
    and which always pads ``kernel_size // 2``: the same positional call here means
    ``stride=breadth, padding=stride``. Write ``SwitchedConv2d(in, out, k, stride=s,
    padding=k // 2, breadth=b)`` (README, "Porting from the original switched conv").

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
        groups: must be 1 (there is no grouped switched conv); kept so the positions match.
        breadth: number of expert kernels.
        selector: a registered selector name (:data:`dynconv.nn.selectors.SELECTORS`:
            ``'conv1x1'``, ``'lambda'`` (a lambda-layer network), ``'lambda_then_conv1x1'``
            (a lambda layer, then a 1x1 conv)) or any module mapping the selector input to
            ``(N, breadth, H_out, W_out)`` logits.
        selector_channels: channels of ``selector_input`` for a built-in selector (default
            ``in_channels``).
        routing: ``'hard'`` (argmax expert) or ``'soft'`` (probability-weighted mix).
        switch_norm: normalise the routing by recent expert usage (:class:`SwitchNorm`).
        norm_buffer: steps of usage history the SwitchNorm keeps.
        selector_dropout: in training only, per example, drop each expert with this
            probability: its logit is masked out of the softmax, so that example's pixels
            cannot pick it (at least one expert is kept per example). Off in eval.
        detach_selector_input: the selector reads ``selector_input.detach()``: the routing
            gradient (hard: ``grad / p``, which has no counterpart in the forward pass, whose
            gate is 1) trains the selector only instead of also flowing back into the
            network through the selector's input. Right after a conversion (identical
            experts) the network's other parameters then get exactly the plain conv
            network's gradients; with the default ``False`` (the original rule) they do not:
            in a trained VQ-VAE with 8 converted convs, the earlier layers' gradients differed
            from the plain net's by 0.3-29x their largest entry (tools/conversion_gradients.py,
            docs/results/vqvae.md).
        backend: the :func:`dynconv.ops.switched_conv2d` backend (``'auto'``, ``'reference'``,
            ``'gather'``, ``'triton'``).

    Shape:
        - Input ``x``: ``(N, in_channels, H, W)``; ``selector_input`` (optional):
          ``(N, selector_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)`` with ``H_out``, ``W_out`` as for
          ``nn.Conv2d`` (:meth:`output_size`).
        - ``weight``: ``(breadth, out_channels, in_channels, kH, kW)``; ``bias``:
          ``(out_channels,)``, shared by all experts.

    Example::

        >>> layer = SwitchedConv2d(16, 32, 3, padding=1, breadth=4)
        >>> layer(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    supports_groups = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        breadth: int = 8,
        selector: str | nn.Module = "conv1x1",
        selector_channels: int | None = None,
        routing: str = "hard",
        switch_norm: bool = True,
        norm_buffer: int = 256,
        selector_dropout: float = 0.0,
        detach_selector_input: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.breadth = positive_int(breadth, "breadth")
        self.routing = choice(routing, "routing", ROUTINGS)
        self.backend = choice(backend, "backend", SWITCHED_BACKENDS.names)
        if not 0.0 <= float(selector_dropout) < 1.0:
            raise ValueError(f"selector_dropout must be in [0, 1), got {selector_dropout}")
        self.selector_dropout = float(selector_dropout)
        if not isinstance(detach_selector_input, bool):
            raise TypeError(f"detach_selector_input must be a bool, got {detach_selector_input!r}")
        self.detach_selector_input = detach_selector_input
        self.selector_channels = positive_int(selector_channels, "selector_channels") if selector_channels else in_channels
        self.weight = nn.Parameter(torch.empty(self.breadth, out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None

        # breadth 1 has nothing to choose: no selector, exactly an nn.Conv2d.
        self.selector: nn.Module | None = None
        self.norm: SwitchNorm | None = None
        if self.breadth > 1:
            if isinstance(selector, nn.Module):
                self.selector = selector
            elif isinstance(selector, str):
                choice(selector, "selector", SELECTORS.names())
                self.selector = build_selector(selector, self.selector_channels, self.breadth, self.stride)
            else:
                raise TypeError(f"selector must be one of {SELECTORS.names()} or an nn.Module, got {type(selector).__name__}")
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
        init_experts(self.weight, self.bias)
        if self.norm is not None:
            self.norm.reset_buffer()

    def _repr_options(self) -> dict:
        return {
            **super()._repr_options(),
            "breadth": self.breadth,
            "selector_channels": self.selector_channels if self.selector_channels != self.in_channels else None,
            "routing": self.routing,
            "selector_dropout": self.selector_dropout,
            "detach_selector_input": self.detach_selector_input,
            "backend": self.backend,
        }

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
        if self.detach_selector_input:
            source = source.detach()
        logits = self.selector(source)
        expected = (x.shape[0], self.breadth, *out_size)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"selector output must have shape (N, breadth, H_out, W_out) = {expected}, got {got}")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # routing decisions in at least fp32
        if self.training and self.selector_dropout > 0:
            # a dropped expert leaves the softmax (probability 0), as in the original author's
            # later DropoutNorm; zeroing its logit instead would leave it selectable
            keep = torch.rand(logits.shape[0], self.breadth, 1, 1, device=logits.device) >= self.selector_dropout
            keep |= ~keep.any(dim=1, keepdim=True)  # at least one expert kept per example
            logits = logits.masked_fill(~keep, float("-inf"))
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
        x, weight, bias = self._autocast(x, weight, bias)
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
        layer = cls(**cls._conv_arguments(conv), breadth=breadth, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

