"""Model registry: name -> builder, with the task each model solves and checked options.

Builders take keyword options only, so a config's ``model.options`` can be validated before
anything is built: a misspelt option fails with the model's name and the accepted options
instead of deep inside a constructor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from ..nn.create import LAYERS, create_conv2d
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
# kinds and the options a model's ``layer`` dict may set: :data:`dynconv.nn.LAYERS`
LAYER_KINDS = LAYERS.names()
LAYER_OPTIONS: dict[str, tuple[str, ...]] = {kind: LAYERS.meta(kind)["model_options"] for kind in LAYER_KINDS}
# Involution replaces a 3x3 conv here, so it keeps the conv's 3x3 footprint by default (RedNet
# uses 7x7; pass layer={"kernel_size": 7} for that). This isolates the operator in comparisons.
INVOLUTION_KERNEL_SIZE = 3


def check_layer_options(kind: str, layer: Mapping[str, Any] | None, model: str) -> dict[str, Any]:
    """Validate ``layer`` (the options of the dynamic layer ``kind``) for ``model``."""
    if kind not in LAYERS:
        raise ValueError(f"model {model!r}: layer kind must be one of {LAYER_KINDS}, got {kind!r}")
    if layer is None:
        return {}
    if not isinstance(layer, Mapping):
        raise TypeError(f"model {model!r}: layer must be a dict of {kind} options, got {type(layer).__name__}")
    accepted = LAYER_OPTIONS[kind]
    unknown = sorted(set(layer) - set(accepted))
    if unknown:
        raise ValueError(f"model {model!r} got unknown {kind} layer option(s) {unknown}; accepted: {list(accepted)}")
    return dict(layer)


def conv3x3(kind: str, channels_in: int, channels_out: int, layer: Mapping[str, Any], *, bias: bool) -> nn.Module:
    """A stride-1, 'same' 3x3 conv of the given ``kind`` (options already checked)."""
    if kind == "involution":  # pads 'same' itself, has no bias, and may change its footprint
        options = {"kernel_size": INVOLUTION_KERNEL_SIZE, **layer}
        return create_conv2d(kind, channels_in, channels_out, options.pop("kernel_size"), **options)
    return create_conv2d(kind, channels_in, channels_out, 3, padding=1, bias=bias, **layer)
