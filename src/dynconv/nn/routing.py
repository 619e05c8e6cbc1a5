"""Routing functions that turn expert probabilities into the weights a switched conv uses."""

from __future__ import annotations

import torch


class _HardRouting(torch.autograd.Function):
    """Differentiable argmax (the switched-conv rule of the original author).

    Forward: the one-hot of the argmax over dim 1. Backward: the incoming gradient at the
    chosen expert divided by the probability recorded in forward; zero elsewhere. The
    one-hot value carries the selector's gradient as if it were ``p / p.detach()``.
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> torch.Tensor:
        index = probs.argmax(dim=1, keepdim=True)
        chosen = probs.gather(1, index)
        ctx.save_for_backward(index, chosen)
        return torch.zeros_like(probs).scatter_(1, index, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        index, chosen = ctx.saved_tensors
        return torch.zeros_like(grad).scatter_(1, index, grad.gather(1, index) / chosen)


def hard_routing(probs: torch.Tensor) -> torch.Tensor:
    """One-hot of ``probs.argmax(1)`` whose backward passes ``grad / p`` to the chosen expert."""
    return _HardRouting.apply(probs)


class _HardGate(torch.autograd.Function):
    """The same rule in ``(index, gate)`` form, without materialising the one-hot."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = probs.argmax(dim=1, keepdim=True)
        ctx.save_for_backward(index, probs.gather(1, index))
        ctx.mark_non_differentiable(index)
        ctx.breadth = probs.shape[1]
        return index.squeeze(1), torch.ones_like(index, dtype=probs.dtype).squeeze(1)

    @staticmethod
    def backward(ctx, _grad_index, grad_gate: torch.Tensor) -> torch.Tensor:
        index, chosen = ctx.saved_tensors
        grad = grad_gate.unsqueeze(1) / chosen
        shape = list(grad.shape)
        shape[1] = ctx.breadth
        return grad.new_zeros(shape).scatter_(1, index, grad)


def hard_index_gate(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(index, gate)`` form of :func:`hard_routing`: ``index`` (N, ...) int64 (argmax
    over dim 1) and a gate equal to 1 in forward that carries ``grad / p`` to the chosen
    probability in backward."""
    return _HardGate.apply(probs)
