"""SwitchNorm: keeps every expert of a switched conv in use.

Routing probabilities are divided by each expert's mean usage over the last ``buffer_size``
training steps and renormalised, so an expert the selector over-uses is damped and a
neglected one is boosted. The usage history is model state: it is saved in ``state_dict``
and is needed at inference (without it the routing sees unnormalised probabilities).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .._checks import positive_int


_state = threading.local()


def statistics_frozen() -> bool:
    """True inside :func:`freeze_statistics` (on this thread)."""
    return getattr(_state, "frozen", False)


@contextlib.contextmanager
def freeze_statistics() -> Iterator[None]:
    """Run training-mode forwards without updating routing statistics (SwitchNorm's usage
    buffer and switched convs' usage EMA), and without SwitchNorm's collective.

    Gradient checkpointing recomputes a block's forward during backward; recording again
    would count the step twice (and, under DDP, run a collective inside backward). Use it as
    the recompute context: ``checkpoint(block, x, use_reentrant=False,
    context_fn=lambda: (contextlib.nullcontext(), freeze_statistics()))``. The recomputed
    output is the same, since the first forward already wrote this step into the buffer.
    """
    previous = statistics_frozen()
    _state.frozen = True
    try:
        yield
    finally:
        _state.frozen = previous


class SwitchNorm(nn.Module):
    """Normalise routing probabilities ``(N, breadth, ...)`` by recent per-expert usage.

    Buffers (persistent): ``usage`` ``(buffer_size, breadth)``, ``write_index`` (next row to
    write) and ``filled`` (True once every row has been written). Until the buffer has
    filled once the layer is the identity. All bookkeeping stays on-device (no host sync),
    except the NaN/inf check, which syncs only to emit its warning outside ``torch.compile``.

    Args:
        breadth: number of experts (dim 1 of the probabilities).
        buffer_size: training steps of usage history kept.

    Shape:
        - Input: ``(N, breadth, *)`` probabilities (summing to 1 over dim 1).
        - Output: same shape, renormalised over dim 1.

    Example::

        >>> norm = SwitchNorm(4, buffer_size=16)
        >>> probs = torch.softmax(torch.randn(2, 4, 8, 8), dim=1)
        >>> norm(probs).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, breadth: int, buffer_size: int = 256) -> None:
        super().__init__()
        self.breadth = positive_int(breadth, "breadth")
        self.buffer_size = positive_int(buffer_size, "buffer_size")
        self.register_buffer("usage", torch.zeros(self.buffer_size, self.breadth))
        self.register_buffer("write_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"breadth={self.breadth}, buffer_size={self.buffer_size}"

    def reset_buffer(self) -> None:
        self.usage.zero_()
        self.write_index.zero_()
        self.filled.zero_()

    @staticmethod
    def step_usage(probs: torch.Tensor) -> torch.Tensor:
        """Probability mass per expert over batch and space, divided by its mean over experts."""
        dims = [0, *range(2, probs.dim())]
        mass = probs.detach().float().sum(dim=dims)
        return mass / mass.mean()

    @torch.no_grad()
    def _record(self, probs: torch.Tensor) -> None:
        usage = self.step_usage(probs)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(usage, op=dist.ReduceOp.SUM)
            usage /= dist.get_world_size()
        finite = torch.isfinite(usage).all()
        if not torch.compiler.is_compiling() and not bool(finite):
            warnings.warn(
                "SwitchNorm: routing probabilities hold NaN/inf; this step is not recorded in the usage buffer",
                RuntimeWarning,
                stacklevel=4,
            )
        slot = self.write_index.view(1)  # tensor indexing: no host sync, no data-dependent guard
        row = self.usage.index_select(0, slot)
        self.usage.index_copy_(0, slot, torch.where(finite, usage.to(self.usage.dtype).view(1, -1), row))
        advanced = self.write_index + finite.long()
        wrapped = advanced >= self.buffer_size
        self.filled.logical_or_(wrapped)
        self.write_index.copy_(torch.where(wrapped, torch.zeros_like(advanced), advanced))

    def mean_usage(self) -> torch.Tensor:
        """Mean usage per expert over the buffer (ones until it has filled once)."""
        return torch.where(self.filled, self.usage.mean(0), torch.ones_like(self.usage[0]))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.dim() < 2 or probs.shape[1] != self.breadth:
            raise ValueError(
                f"SwitchNorm expects probabilities (N, breadth={self.breadth}, ...), got shape {tuple(probs.shape)}"
            )
        if self.training and not statistics_frozen():
            self._record(probs)
        norm = self.mean_usage().to(probs.dtype).view(1, -1, *([1] * (probs.dim() - 2)))
        scaled = probs / norm
        return scaled / scaled.sum(dim=1, keepdim=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "usage" not in state_dict:
            warnings.warn(
                f"SwitchNorm '{prefix.rstrip('.')}': the state_dict has no usage buffer; inference without the "
                "trained buffer gives poor results (the routing is not normalised as in training)",
                UserWarning,
                stacklevel=2,
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
