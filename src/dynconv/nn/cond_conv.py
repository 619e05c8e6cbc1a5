"""CondConv2d / CondLinear: per-example kernels mixed from expert kernels.

``routing='sigmoid'`` is CondConv (Yang et al. 2019); ``routing='softmax'`` with a
``temperature`` is Dynamic Convolution (Chen et al. 2020), whose papers anneal the
temperature from ~30 to 1 early in training (set ``layer.temperature`` as you go).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.condconv import BACKENDS as COND_BACKENDS
from .._checks import choice, float_input, positive_int
from .base import DynamicConv2d, IntOrPair, init_experts

ROUTINGS = ("sigmoid", "softmax")


class _ExpertRouting(nn.Module):
    """Shared routing for the CondConv family: a linear map of a pooled descriptor to
    ``num_experts`` weights via sigmoid or temperature softmax."""

    def __init__(self, features: int, num_experts: int, routing: str, temperature: float, factory: dict) -> None:
        super().__init__()
        self.routing = choice(routing, "routing", ROUTINGS)
        self.temperature = temperature
        self.router = nn.Linear(features, num_experts, **factory)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not float(value) > 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self._temperature = float(value)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        logits = self.router(descriptor)
        if self.routing == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits / self._temperature, dim=1)

    def neutralise(self) -> torch.Tensor:
        """Zero the router so every example gets the same weights; returns them (num_experts,)."""
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.zero_()
        zeros = torch.zeros(1, self.router.out_features, device=self.router.weight.device)
        return (torch.sigmoid(zeros) if self.routing == "sigmoid" else torch.softmax(zeros, dim=1))[0]


def _preserving_experts(weight: torch.Tensor, routing_weights: torch.Tensor, noise: float) -> torch.Tensor:
    """Expert kernels ``W / sum(a) + D_i`` with ``sum_i a_i D_i = 0``: the mix equals ``W``
    exactly while the experts differ, so training can tell them apart."""
    experts = routing_weights.numel()
    base = (weight / routing_weights.sum()).unsqueeze(0).expand(experts, *weight.shape)
    if noise <= 0 or experts == 1:
        return base.clone()
    scale = noise * weight.float().std().clamp_min(1e-12)
    d = torch.randn(experts, *weight.shape, device=weight.device, dtype=torch.float32) * scale
    d = d - d.mean(0, keepdim=True)  # all a_i are equal after neutralise(), so sum a_i D_i = 0
    return base + d.to(weight.dtype)


class _ExpertMixture(nn.Module):
    """What CondConv2d and CondLinear share: expert weights ``(num_experts, out, ...)``, an
    expert bias ``(num_experts, out)``, the router, and function-preserving conversion."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    route: _ExpertRouting

    @property
    def routing(self) -> str:
        return self.route.routing

    @property
    def temperature(self) -> float:
        return self.route.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.route.temperature = value

    def reset_parameters(self) -> None:
        """Each expert initialised like the dense layer (``nn.Conv2d`` / ``nn.Linear``) of its shape."""
        init_experts(self.weight, self.bias)
        self.route.router.reset_parameters()

    def _copy_preserving(self, source: nn.Module, expert_noise: float) -> None:
        """Make the layer compute ``source``'s function (see :meth:`CondConv2d.from_conv`)."""
        a = self.route.neutralise()
        with torch.no_grad():
            self.weight.copy_(_preserving_experts(source.weight, a, expert_noise))
            if source.bias is not None:
                self.bias.copy_((source.bias / a.sum()).unsqueeze(0).expand_as(self.bias))
        self.train(source.training)


class CondConv2d(_ExpertMixture, DynamicConv2d):
    """Conditionally parameterised conv: ``kernel_n = sum_i a_ni W_i``, ``a = route(GAP(x))``.

    Computed batched for the whole batch (no Python loop over examples). The positional
    arguments are ``nn.Conv2d``'s; the rest are keyword-only.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d``.
        num_experts: number of expert kernels mixed per example.
        routing: ``'sigmoid'`` (CondConv) or ``'softmax'`` (Dynamic Convolution, with
            ``temperature``).
        temperature: softmax temperature (settable during training: ``layer.temperature``).
        backend: the :func:`dynconv.ops.cond_conv2d` backend (``'auto'``, ``'reference'``,
            ``'cpu'``, ``'experts'``, ``'triton'``).

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)``, as ``nn.Conv2d`` (:meth:`output_size`).
        - ``weight``: ``(num_experts, out_channels, in_channels / groups, kH, kW)``; ``bias``:
          ``(num_experts, out_channels)``.

    Example::

        >>> layer = CondConv2d(16, 32, 3, padding=1, num_experts=4)
        >>> layer(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

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
        num_experts: int = 8,
        routing: str = "sigmoid",
        temperature: float = 1.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.num_experts = positive_int(num_experts, "num_experts")
        self.backend = choice(backend, "backend", COND_BACKENDS.names)
        self.route = _ExpertRouting(in_channels, num_experts, routing, temperature, factory)
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        self.reset_parameters()

    def _repr_options(self) -> dict:
        return {
            **super()._repr_options(),
            "num_experts": self.num_experts,
            "routing": self.routing,
            "temperature": self.temperature,
            "backend": self.backend,
        }

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float_input(x, "x", channels=self.in_channels)
        weights = self.routing_weights(x)
        x, weight, bias, weights = self._autocast(x, self.weight, self.bias, weights)
        with torch.autocast(x.device.type, enabled=False):
            return ops.cond_conv2d(
                x, weight, bias, weights.to(x.dtype), self.stride, self.padding, self.dilation, self.groups, self.backend
            )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_experts: int = 8, *, expert_noise: float = 1e-2, **kwargs) -> "CondConv2d":
        """Function-preserving conversion: the router starts at zero (equal weights for every
        input) and the experts are ``W / sum(a)`` plus zero-sum noise of relative size
        ``expert_noise`` (so they can specialise), hence the output equals ``conv``'s."""
        layer = cls(**cls._conv_arguments(conv), num_experts=num_experts, **kwargs)
        layer._copy_preserving(conv, expert_noise)
        return layer


class CondLinear(_ExpertMixture):
    """Fully connected CondConv: ``y_n = (sum_i a_ni W_i) x_n + sum_i a_ni b_i``, ``a = route(x_n)``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        num_experts, routing, temperature: as :class:`CondConv2d`.

    Shape:
        - Input: ``(*, in_features)``; output: ``(*, out_features)``.
        - ``weight``: ``(num_experts, out_features, in_features)``; ``bias``:
          ``(num_experts, out_features)``.

    Example::

        >>> layer = CondLinear(16, 32, num_experts=4)
        >>> layer(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        num_experts: int = 8,
        routing: str = "sigmoid",
        temperature: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.num_experts = positive_int(num_experts, "num_experts")
        self.route = _ExpertRouting(in_features, num_experts, routing, temperature, factory)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}, routing={self.routing!r}, temperature={self.temperature}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be at least 2-D (..., in_features), got {getattr(x, 'shape', type(x))}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        float_input(flat, "x", ndim=2, channels=self.in_features)
        y = ops.cond_linear(flat, self.weight, self.bias, self.route(flat))
        return y.view(*lead, self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int = 8, *, expert_noise: float = 1e-2, **kwargs) -> "CondLinear":
        """Function-preserving conversion of an ``nn.Linear`` (see :meth:`CondConv2d.from_conv`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, num_experts=num_experts,
            device=linear.weight.device, dtype=linear.weight.dtype, **kwargs,
        )
        layer._copy_preserving(linear, expert_noise)
        return layer
