"""``involution2d`` and its backends.

* :mod:`.functional`: the public function, argument checks, the reference, the backend table
  and the ``dynconv::involution2d_fused`` custom op;
* :mod:`.cpu`: ``backend='cpu'``, the PyTorch path (CPU, or any device);
* :mod:`.triton_launch`: ``backend='triton'``, launching the kernels of :mod:`.triton_kernels`.
"""

from .functional import BACKENDS, involution2d, reference_involution2d

__all__ = ["BACKENDS", "involution2d", "reference_involution2d"]
