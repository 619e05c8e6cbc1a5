"""Modules: parameters and routing. The math lives in :mod:`dynconv.ops`."""

from .cond_conv import CondConv2d, CondLinear
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
    "LambdaLayer",
    "LambdaSelector",
    "hard_routing",
    "hard_index_gate",
    "freeze_statistics",
]
