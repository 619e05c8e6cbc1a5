"""Pure functional ops with autograd. Each takes ``backend='auto'|'reference'|...``;
the ``reference`` backend is plain PyTorch math, kept as ground truth for the fast ones.

Where things live: one package per op (:mod:`.switched`, :mod:`.condconv`,
:mod:`.involution`), each holding the public function and its reference
(``functional.py``), its PyTorch fast path (``gather.py`` / ``cpu.py``) and its Triton
launcher and kernels (``triton_launch.py``, ``triton_kernels.py``); shared by all three:
:mod:`.dispatch` (backend tables, the ``auto`` rule, the Triton check), :mod:`.custom_op`
(defining a custom op, and the backends' conventions) and :mod:`.triton_utils`.
"""

from .condconv import cond_conv2d, cond_linear
from .involution import involution2d
from .switched import switched_conv2d

__all__ = ["switched_conv2d", "cond_conv2d", "cond_linear", "involution2d"]
