"""``cond_conv2d`` / ``cond_linear`` and their backends.

* :mod:`.functional`: the public functions, argument checks, the reference, the backend
  table and the ``dynconv::cond_conv2d_fused`` custom op;
* :mod:`.cpu`: ``backend='cpu'``, the per-example PyTorch path (CPU, or any device);
* :mod:`.experts`: ``backend='experts'``, every expert's conv as one dense conv (any device;
  ``auto``'s choice on small maps);
* :mod:`.triton_launch`: ``backend='triton'``, launching the kernels of :mod:`.triton_kernels`.
"""

from .functional import BACKENDS, cond_conv2d, cond_linear, reference_cond_conv2d

__all__ = ["BACKENDS", "cond_conv2d", "cond_linear", "reference_cond_conv2d"]
