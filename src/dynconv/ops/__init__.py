"""Pure functional ops with autograd. Each takes ``backend='auto'|'reference'|...``;
the ``reference`` backend is plain PyTorch math, kept as ground truth for the fast ones."""

from . import _custom_ops_cond_inv  # noqa: F401  (registers the 'cpu'/'triton' backends of cond_conv2d / involution2d)
from . import switched_gather, switched_triton  # noqa: F401  (register switched_conv2d's 'gather'/'triton' backends)
from .condconv import cond_conv2d, cond_linear
from .involution import involution2d
from .switched import switched_conv2d

__all__ = ["switched_conv2d", "cond_conv2d", "cond_linear", "involution2d"]
