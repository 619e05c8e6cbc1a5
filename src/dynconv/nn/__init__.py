"""Modules: parameters and routing. The math lives in :mod:`dynconv.ops`."""

from .base import DynamicConv2d, conv_padding
from .cond_conv import CondConv2d, CondLinear
from .create import LAYERS, create_conv2d
from .involution import Involution2d
from .routing import hard_index_gate, hard_routing
from .selectors import LambdaLayer, LambdaSelector
from .switch_norm import SwitchNorm, freeze_statistics
from .switched_conv import SwitchedConv2d

__all__ = [
    "SwitchedConv2d",
    "SwitchNorm",
    "CondConv2d",
    "CondLinear",
    "Involution2d",
    "DynamicConv2d",
    "create_conv2d",
    "LAYERS",
    "conv_padding",
    "LambdaLayer",
    "LambdaSelector",
    "hard_routing",
    "hard_index_gate",
    "freeze_statistics",
]
