"""Exponential moving average of a model's weights (``train.ema``)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * weights`` for floating-point parameters after
    every optimizer step; buffers (BatchNorm statistics, SwitchNorm usage) are copied.
    ``module`` is a frozen copy of the model holding the averaged weights (used for evaluation)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for m in self.module.modules():  # drop per-instance forward wrappers (checkpointing, autocast)
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_original_forward", None)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, shadow in self.module.named_parameters():
            value = params[name].detach()
            if shadow.dtype.is_floating_point:
                shadow.lerp_(value.to(shadow.dtype), 1.0 - self.decay)
            else:
                shadow.copy_(value)
        buffers = dict(model.named_buffers())
        for name, shadow in self.module.named_buffers():
            if name in buffers:
                shadow.copy_(buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
