"""A loader that keeps a small classification dataset on the GPU.

CIFAR-sized data fits in GPU memory many times over (50,000 x 3 x 32 x 32 uint8 = 150 MB),
and a ResNet-18 step on an H100 is faster than CPU workers can decode, crop and copy
images. So the images are decoded once into one uint8 tensor on ``device`` and batches are
shuffled, cropped, flipped and normalised there. Randomness comes from CPU generators seeded
from ``(seed, epoch, batch)`` (a few small tensors per batch), so a resumed run repeats
the same batches on any device.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .registry import DatasetError, sample_generator

__all__ = ["DeviceLoader"]

_SHUFFLE_STREAM = 2**31 - 1  # the index slot of sample_generator used for the epoch permutation


class DeviceLoader:
    """Iterate ``{"image": float32 (B, 3, H, W) normalised, "label": int64 (B,)}`` on ``device``.

    ``dataset`` must offer ``tensors() -> (uint8 (N, 3, H, W), int64 (N,))`` and
    ``normalise`` (as :class:`~dynconv.data.classification.ClassificationDataset` does); the
    dataset's own per-item augmentation is not used. ``augment='crop_flip'`` zero-pads by
    ``pad``, crops back at a random offset and flips half the images left-right.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: str | None = "crop_flip",
        pad: int = 4,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if augment not in (None, "crop_flip"):
            raise ValueError(f"augment must be 'crop_flip' or None, got {augment!r}")
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        if not hasattr(dataset, "tensors") or not hasattr(dataset, "normalise"):
            raise DatasetError(
                f"DeviceLoader needs a classification dataset with tensors() and normalise() "
                f"(cifar10, image_folder), got {type(dataset).__name__}"
            )
        images, labels = dataset.tensors()
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{type(dataset).__name__}.tensors() must return uint8 (N, C, H, W) and (N,) labels, "
                f"got {images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.pad = pad
        self.drop_last = drop_last
        self.epoch = 0
        self._mean = torch.tensor(dataset.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(dataset.std, device=self.device).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and augmentation (call before iterating)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> torch.Tensor:
        n = self.images.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=sample_generator(self.seed, self.epoch, _SHUFFLE_STREAM))

    def _crop_flip(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = batch.shape
        p = self.pad
        dy = torch.randint(2 * p + 1, (b,), generator=gen).to(self.device)
        dx = torch.randint(2 * p + 1, (b,), generator=gen).to(self.device)
        flip = torch.randint(2, (b,), generator=gen).to(self.device).bool()
        padded = F.pad(batch, (p, p, p, p)) if p else batch
        rows = dy[:, None] + torch.arange(h, device=self.device)[None]  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=self.device)[None]  # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        n = torch.arange(b, device=self.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order().to(self.device)
        for step in range(len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            batch = self.images.index_select(0, idx)
            if self.augment == "crop_flip":
                batch = self._crop_flip(batch, sample_generator(self.seed, self.epoch, step))
            image = (batch.float() / 255.0 - self._mean) / self._std
            yield {"image": image.contiguous(), "label": self.labels.index_select(0, idx)}
