"""Gradient checkpointing of a model's blocks (``train.checkpointing``).

Each block from ``model.checkpoint_blocks()`` runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` in training: its activations are
recomputed in the backward pass instead of stored. Blocks with state that the forward
updates (BatchNorm running statistics, SwitchNorm usage history, switched convs' recent
usage) would see that update twice. So the recomputation runs under
:func:`dynconv.nn.freeze_statistics` (SwitchNorm neither records again nor runs its
collective inside backward, and normalises with the buffer the first forward used), and
the buffers are put back to their post-forward values afterwards (BatchNorm in training
normalises with batch statistics, so only its running statistics needed restoring). The
recomputed activations are therefore identical and every buffer is updated once.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn.switch_norm import freeze_statistics

_ATTR = "_dynconv_checkpointed"


class _BufferStates:
    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.after: list[torch.Tensor] | None = None

    def buffers(self) -> list[torch.Tensor]:
        return [b for b in self.block.buffers()]

    @contextlib.contextmanager
    def forward_context(self):
        yield
        self.after = [b.detach().clone() for b in self.buffers()]

    @contextlib.contextmanager
    def recompute_context(self):
        try:
            with freeze_statistics():
                yield
        finally:
            if self.after is not None:
                with torch.no_grad():
                    for b, v in zip(self.buffers(), self.after):
                        b.copy_(v)


def enable_block_checkpointing(model: nn.Module) -> int:
    """Wrap the forward of every block in ``model.checkpoint_blocks()``; returns how many
    (0 when the model defines no blocks). Idempotent."""
    get_blocks = getattr(model, "checkpoint_blocks", None)
    if get_blocks is None:
        return 0
    count = 0
    for block in get_blocks():
        if getattr(block, _ATTR, False):
            count += 1
            continue
        original = block.forward

        def forward(*args, _original=original, _block=block, **kwargs):
            if not (_block.training and torch.is_grad_enabled()):
                return _original(*args, **kwargs)
            states = _BufferStates(_block)
            return checkpoint(
                _original, *args, use_reentrant=False,
                context_fn=lambda: (states.forward_context(), states.recompute_context()), **kwargs,
            )

        block.forward = forward
        setattr(block, _ATTR, True)
        count += 1
    return count
