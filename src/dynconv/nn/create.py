"""Layer kinds by name: :func:`create_conv2d` and the :data:`LAYERS` registry behind it.

The one list of conv kinds (``conv``, ``switched``, ``condconv``, ``involution``) and their
options: models build their dynamic layers here, :func:`dynconv.convert` takes its targets
from here, and config checks read the options from here.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..registry import Registry, signature_options
from .cond_conv import CondConv2d
from .involution import Involution2d
from .switched_conv import SwitchedConv2d

__all__ = ["LAYERS", "create_conv2d"]

#: kind -> builder ``(in_channels, out_channels, kernel_size, **options) -> nn.Module``.
#: ``LAYERS.meta(kind)["model_options"]``: the options a model's ``layer`` dict may set
#: (the rest, such as geometry and ``bias``, the model decides).
LAYERS = Registry("layer kind", positional=("in_channels", "out_channels", "kernel_size"), meta={"model_options": None})


def _register(kind: str, builder: Any, model_options: tuple[str, ...]) -> None:
    LAYERS.register(kind, builder, model_options=model_options)
    unknown = signature_options(builder).unknown(model_options)
    if unknown:
        raise ValueError(f"layer kind {kind!r}: model options {unknown} are not arguments of its builder")


def _options_of(cls: type, skip: tuple[str, ...]):
    """Decorator: the builder's ``**options`` are ``cls``'s arguments (less ``skip``); written
    into the builder's signature, so the registry reads them from ``cls`` (listed once)."""

    def decorate(builder):
        own = [p for p in inspect.signature(builder).parameters.values() if p.kind is not p.VAR_KEYWORD]
        theirs = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(cls).parameters.values() if p.name not in skip]
        builder.__signature__ = inspect.signature(builder).replace(parameters=[*own, *theirs])
        return builder

    return decorate


@_options_of(Involution2d, skip=("channels", "kernel_size", "stride"))
def involution(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, **options: Any) -> Involution2d:
    """:class:`Involution2d` from conv-shaped arguments; it keeps the channel count, so
    ``in_channels`` must equal ``out_channels``. It pads 'same' itself and has no bias.
    ``options``: Involution2d's other arguments (``groups``, ``reduction``, ``dilation``, ...)."""
    if in_channels != out_channels:
        raise ValueError(
            f"involution keeps the channel count: needs in_channels == out_channels, got {in_channels} -> {out_channels}"
        )
    return Involution2d(in_channels, kernel_size, stride, **options)


_register("conv", nn.Conv2d, ())
_register(
    "switched", SwitchedConv2d,
    ("breadth", "selector", "routing", "switch_norm", "norm_buffer", "selector_dropout", "detach_selector_input",
     "backend"),
)
_register("condconv", CondConv2d, ("num_experts", "routing", "temperature", "backend"))
# a model's involution layer may change its footprint (kernel_size), not just its options
_register("involution", involution, ("kernel_size", "groups", "reduction", "dilation", "backend"))


def create_conv2d(kind: str, in_channels: int, out_channels: int, kernel_size: Any, **options: Any) -> nn.Module:
    """A 2-D conv layer of ``kind``: ``'conv'`` (``nn.Conv2d``), ``'switched'``
    (:class:`SwitchedConv2d`), ``'condconv'`` (:class:`CondConv2d`) or ``'involution'``
    (:class:`Involution2d`, which needs ``in_channels == out_channels``).

    Args:
        kind: one of ``LAYERS.names()``.
        in_channels, out_channels, kernel_size: as ``nn.Conv2d``.
        **options: the layer's other arguments by keyword (``stride``, ``padding``,
            ``bias``, ``breadth``, ``num_experts``, ...); an unknown kind or option raises
            ``ValueError`` naming it and the accepted ones (``LAYERS.options(kind)``).

    Shape:
        ``(N, in_channels, H, W) -> (N, out_channels, H_out, W_out)``, as the layer computes it.

    Example::

        >>> layer = create_conv2d("switched", 16, 16, 3, padding=1, breadth=4)
        >>> layer(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """
    return LAYERS.build(kind, in_channels, out_channels, kernel_size, **options)
