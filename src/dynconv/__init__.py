"""dynconv: input-conditioned ("dynamic") convolutions for PyTorch."""

from . import ops

__version__ = "0.1.0"
