"""Routing insight: which expert each pixel uses, and how evenly experts are used."""

from __future__ import annotations

import math

import torch
from torch import nn

from .nn.switched_conv import SwitchedConv2d


def switched_layers(model: nn.Module) -> dict[str, SwitchedConv2d]:
    """The model's switched convs by module name (``''`` if the model is one)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SwitchedConv2d)}


@torch.no_grad()
def selector_maps(model: nn.Module, x, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run ``model(x, *args, **kwargs)`` in eval mode and return, per switched conv, the
    chosen expert per output pixel as a ``LongTensor (N, H_out, W_out)``.

    The model's train/eval state and the SwitchNorm buffers are left as they were.
    """
    layers = switched_layers(model)
    was_training = {m: m.training for m in model.modules()}
    for layer in layers.values():
        layer.record_selection = True
        layer.last_selection = None
    model.eval()
    try:
        model(x, *args, **kwargs)
        maps = {}
        for name, layer in layers.items():
            if layer.last_selection is not None:  # breadth-1 layers select nothing
                maps[name] = layer.last_selection
    finally:
        for module, mode in was_training.items():
            module.training = mode
        for layer in layers.values():
            layer.record_selection = False
            layer.last_selection = None
    return maps


def normalised_entropy(fractions: torch.Tensor) -> float:
    """Entropy of a usage distribution over its maximum, ``log(breadth)``: 1 = all experts
    used equally, 0 = one expert takes every pixel."""
    p = fractions.double().clamp_min(0)
    p = p / p.sum().clamp_min(1e-30)
    if p.numel() < 2:
        return 1.0
    h = -(p * p.clamp_min(1e-30).log()).sum().item()
    return h / math.log(p.numel())


def routing_stats(model: nn.Module) -> dict[str, dict]:
    """Per switched conv: ``usage`` (fraction of pixels each expert won, averaged over recent
    training steps with an EMA of ~50 steps), ``entropy`` (normalised, see
    :func:`normalised_entropy`), ``steps`` (training steps seen) and, when the layer has a
    filled SwitchNorm, ``switchnorm_usage`` (mean relative usage over its buffer)."""
    stats = {}
    for name, layer in switched_layers(model).items():
        usage = layer.recent_usage.detach().float().cpu()
        entry = {
            "usage": usage,
            "entropy": normalised_entropy(usage),
            "steps": int(layer.recent_steps),
        }
        if layer.norm is not None and bool(layer.norm.filled):
            entry["switchnorm_usage"] = layer.norm.mean_usage().detach().float().cpu()
        stats[name] = entry
    return stats
