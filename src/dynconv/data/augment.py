"""Augmentations drawn from an explicit generator (see :func:`sample_generator`).

Each function takes the per-sample ``torch.Generator`` so the same ``(seed, epoch, index)``
always gives the same sample, whatever the worker or the resume point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["randint", "crop_flip", "dihedral", "random_sr_crop"]


def randint(high: int, generator: torch.Generator) -> int:
    """A uniform int in ``[0, high)`` from ``generator``."""
    return int(torch.randint(high, (1,), generator=generator).item())


def crop_flip(img: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """CIFAR-style augmentation of ``(C, H, W)``: zero-pad by ``pad``, crop back to ``H x W``
    at a random offset, flip left-right with probability 1/2 (the standard ResNet recipe)."""
    c, h, w = img.shape
    dy, dx, flip = randint(2 * pad + 1, generator), randint(2 * pad + 1, generator), randint(2, generator)
    if pad > 0:
        img = F.pad(img, (pad, pad, pad, pad))[:, dy : dy + h, dx : dx + w]
    if flip:
        img = img.flip(-1)
    return img.contiguous()


def dihedral(images: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """The same random flip / 90-degree rotation (one of 8) applied to every ``(C, H, W)``
    image: horizontal flip, vertical flip and transpose, each with probability 1/2."""
    hflip, vflip, transpose = (randint(2, generator) for _ in range(3))
    out = []
    for img in images:
        if hflip:
            img = img.flip(-1)
        if vflip:
            img = img.flip(-2)
        if transpose:
            img = img.transpose(-1, -2)
        out.append(img.contiguous())
    return out


def random_sr_crop(
    lr: torch.Tensor, hr: torch.Tensor, scale: int, hr_patch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops: an ``hr_patch // scale`` LR patch at a random position and the HR patch
    that covers exactly the same area (its offset is the LR offset times ``scale``)."""
    lr_patch = hr_patch // scale
    lh, lw = lr.shape[-2:]
    y, x = randint(lh - lr_patch + 1, generator), randint(lw - lr_patch + 1, generator)
    lr_crop = lr[..., y : y + lr_patch, x : x + lr_patch]
    hr_crop = hr[..., y * scale : (y + lr_patch) * scale, x * scale : (x + lr_patch) * scale]
    return lr_crop, hr_crop
