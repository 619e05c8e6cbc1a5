"""Model registry: name -> builder, with the task each model solves and checked options.

Builders take keyword options only, so a config's ``model.options`` can be validated before
anything is built: a misspelt option fails with the model's name and the accepted options
instead of deep inside a constructor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from ..nn.cond_conv import CondConv2d
from ..nn.involution import Involution2d
from ..nn.switched_conv import SwitchedConv2d
from ..registry import Registry

Builder = Callable[..., nn.Module]

TASKS = ("classification", "super_resolution", "reconstruction")
#: name -> builder; ``MODELS.meta(name)["task"]`` is the task it solves.
MODELS = Registry("model", meta={"task": TASKS})


def register_model(name: str, *, task: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(**options) -> nn.Module`` under ``name`` for ``task``."""
    return MODELS.register(name, task=task)


def model_task(name: str) -> str:
    """``'classification' | 'super_resolution' | 'reconstruction'`` for a registered model."""
    return MODELS.meta(name)["task"]


def model_options(name: str) -> dict[str, Any]:
    """The accepted options of a model and their defaults (what a config may set)."""
    return dict(MODELS.options(name).defaults)


def build_model(name: str, **options: Any) -> nn.Module:
    """Build a registered model; an unknown option raises ``ValueError`` naming the model,
    the option(s) and the accepted ones."""
    return MODELS.build(name, **options)


# -- dynamic layers in place of a 3x3 conv ---------------------------------------------------
LAYER_KINDS = ("conv", "switched", "condconv", "involution")
LAYER_OPTIONS: dict[str, tuple[str, ...]] = {
    "conv": (),
    "switched": ("breadth", "selector", "routing", "switch_norm", "norm_buffer", "selector_dropout", "backend"),
    "condconv": ("num_experts", "routing", "temperature", "backend"),
    "involution": ("kernel_size", "groups", "reduction", "dilation", "backend"),
}
# Involution replaces a 3x3 conv here, so it keeps the conv's 3x3 footprint by default (RedNet
# uses 7x7; pass layer={"kernel_size": 7} for that). This isolates the operator in comparisons.
INVOLUTION_KERNEL_SIZE = 3


def check_layer_options(kind: str, layer: Mapping[str, Any] | None, model: str) -> dict[str, Any]:
    """Validate ``layer`` (the options of the dynamic layer ``kind``) for ``model``."""
    if kind not in LAYER_KINDS:
        raise ValueError(f"model {model!r}: layer kind must be one of {LAYER_KINDS}, got {kind!r}")
    if layer is None:
        return {}
    if not isinstance(layer, Mapping):
        raise TypeError(f"model {model!r}: layer must be a dict of {kind} options, got {type(layer).__name__}")
    unknown = sorted(set(layer) - set(LAYER_OPTIONS[kind]))
    if unknown:
        raise ValueError(
            f"model {model!r} got unknown {kind} layer option(s) {unknown}; accepted: {list(LAYER_OPTIONS[kind])}"
        )
    return dict(layer)


def conv3x3(kind: str, channels_in: int, channels_out: int, layer: Mapping[str, Any], *, bias: bool) -> nn.Module:
    """A stride-1, 'same' 3x3 conv of the given ``kind`` (options already checked)."""
    if kind == "conv":
        return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)
    if kind == "switched":
        return SwitchedConv2d(channels_in, channels_out, 3, padding=1, bias=bias, **layer)
    if kind == "condconv":
        return CondConv2d(channels_in, channels_out, 3, padding=1, bias=bias, **layer)
    if channels_in != channels_out:
        raise ValueError(
            f"involution keeps the channel count: needs channels_in == channels_out, got {channels_in} -> {channels_out}"
        )
    options = {"kernel_size": INVOLUTION_KERNEL_SIZE, **layer}
    return Involution2d(channels_in, **options)
