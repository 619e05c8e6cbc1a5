"""Which implementation of an op runs: each op's backend table, the one Triton check and the
one ``auto`` rule.

Every op (``switched_conv2d``, ``cond_conv2d``, ``involution2d``) declares its fast backends
in a :class:`Backends` table in its own package: a backend name and the module of that
package that implements it (``forward`` and ``backward``, no autograd inside). A module is
imported at its backend's first call, so importing dynconv imports neither triton nor any
kernel (Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it may be set any
time before the first launch).

``backend='auto'``, the same rule for every op:

* a CUDA tensor, with triton installed: ``'triton'``;
* otherwise the op's PyTorch fast path, which runs on any device: ``'gather'`` for
  ``switched_conv2d``; an op whose best PyTorch path depends on the shape names a rule that
  picks one from the call's arguments instead (``cond_conv2d``: ``'cpu'`` or ``'experts'``,
  whichever its cost model says is cheaper:
  :func:`dynconv.ops.condconv.functional.pytorch_backend`; ``involution2d``: ``'cpu'``, or
  the unfold ``'reference'`` on tiny maps:
  :func:`dynconv.ops.involution.functional.pytorch_backend`);
* ``'reference'`` only where an op has no fast path for its input (``switched_conv2d``
  with soft routing weights).

A CPU tensor never picks ``'triton'`` by itself: Triton's CPU interpreter
(``TRITON_INTERPRET=1``) exists for tests and is far too slow for anything else.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Iterator

import torch

#: Whether triton is installed (found, not imported: importing it is slow, and happens at
#: the first launch).
TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``x``: triton is installed and ``x`` is a CUDA
    tensor, or a CPU tensor with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    return TRITON_INSTALLED and (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")


class Backends:
    """An op's fast backends: ``name -> module`` (relative to the op's package), each module
    holding ``forward`` and ``backward`` and imported at its first call.

    ``name in table`` and iteration list the backends available in this install (``'triton'``
    only with triton installed); :attr:`names` lists every name the op accepts.
    """

    def __init__(self, op: str, package: str, modules: dict[str, str], portable: str | Callable[..., str]) -> None:
        self.op = op
        self.package = package
        self.modules = dict(modules)
        #: The PyTorch fast path, 'auto' off CUDA (or without triton): a backend name, or a rule
        #: ``(x, *op_args) -> name`` for an op with several (``op_args`` as the op passes them
        #: to :meth:`choose`).
        self.portable = portable
        #: Every ``backend=`` value the op accepts.
        self.names: tuple[str, ...] = ("auto", "reference", *modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules and (name != "triton" or TRITON_INSTALLED)

    def __iter__(self) -> Iterator[str]:
        return (name for name in self.modules if name in self)

    def __repr__(self) -> str:
        return f"Backends({self.op}: {tuple(self)})"

    def module(self, name: str) -> ModuleType:
        """The module implementing backend ``name`` (imported on first use)."""
        if name not in self.modules:
            raise ValueError(f"{self.op}: no backend {name!r}; declared: {tuple(self.modules)}")
        return importlib.import_module(self.modules[name], self.package)

    def check(self, backend: str) -> str:
        """``backend`` if the op accepts that name, else ``ValueError``."""
        if backend not in self.names:
            raise ValueError(f"backend must be one of {self.names}, got {backend!r}")
        return backend

    def choose(self, backend: str, x: torch.Tensor, *op_args: object) -> str:
        """The backend that runs on ``x``: ``backend`` itself, or for ``'auto'`` the rule in
        this module's docstring (``op_args``: what the op's portable rule needs besides ``x``).
        Raises for a name that is unknown, not available in this install (``ValueError``), or
        ``'triton'`` where Triton cannot run (``RuntimeError``)."""
        self.check(backend)
        if backend == "auto":
            if x.is_cuda and "triton" in self:
                return "triton"
            return self.portable(x, *op_args) if callable(self.portable) else self.portable
        if backend != "reference" and backend not in self:
            raise ValueError(
                f"backend {backend!r} is not available here (triton is not installed); "
                f"available: {('reference', *self)}"
            )
        if backend == "triton" and not triton_runs_on(x):
            raise RuntimeError(
                f"{self.op}(backend='triton') needs a CUDA tensor (or TRITON_INTERPRET=1, set before the "
                f"first launch, for CPU tensors); x is on {x.device}"
            )
        return backend
