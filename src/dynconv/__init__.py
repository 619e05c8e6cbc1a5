"""dynconv: input-conditioned ("dynamic") convolutions for PyTorch.

Layers: :class:`SwitchedConv2d` (+ :class:`SwitchNorm`), :class:`CondConv2d` /
:class:`CondLinear`, :class:`Involution2d`; any conv kind by name: :func:`create_conv2d`.
Math with selectable backends: :mod:`dynconv.ops`.
Model surgery: :func:`convert`. Routing insight: :func:`selector_maps`, :func:`routing_stats`,
:mod:`dynconv.viz`.
"""

from . import ops
from .convert import convert
from .insight import routing_stats, selector_maps
from .nn import CondConv2d, CondLinear, Involution2d, SwitchedConv2d, SwitchNorm, create_conv2d

__version__ = "0.1.0"

__all__ = [
    "SwitchedConv2d",
    "SwitchNorm",
    "CondConv2d",
    "CondLinear",
    "Involution2d",
    "create_conv2d",
    "convert",
    "selector_maps",
    "routing_stats",
    "ops",
]


def __getattr__(name: str):
    if name == "viz":  # imported lazily: it needs matplotlib
        import importlib

        return importlib.import_module(".viz", __name__)
    raise AttributeError(f"module 'dynconv' has no attribute {name!r}")
