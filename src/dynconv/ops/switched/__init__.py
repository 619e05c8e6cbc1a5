"""``switched_conv2d`` and its backends.

* :mod:`.functional`: the public function, argument checks, the dense reference, the backend
  table and the ``dynconv::switched_conv2d_<backend>`` custom ops;
* :mod:`.gather`: ``backend='gather'``, the PyTorch path (CPU, or any device);
* :mod:`.triton_launch`: ``backend='triton'``, launching the kernels of :mod:`.triton_kernels`.
"""

from .functional import (
    BACKENDS,
    all_experts,
    check_routing,
    output_size,
    reference_switched_conv2d,
    switched_conv2d,
    triton_switched_conv2d,
)

__all__ = [
    "BACKENDS",
    "all_experts",
    "check_routing",
    "output_size",
    "reference_switched_conv2d",
    "switched_conv2d",
    "triton_switched_conv2d",
]
