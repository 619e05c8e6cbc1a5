"""The data side of training: the sampler that makes the batch order a function of
``(seed, epoch)`` (exact resume, the same batches on any number of ranks), the loaders over it,
and moving batches to the device.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from ..config import Config


class EpochBatchSampler:
    """Batches of indices for one rank: a permutation seeded by ``(seed, epoch)``, split
    across ``world`` ranks, full batches only. ``set_epoch(epoch, start)`` starts at batch
    ``start`` of the epoch (resuming mid-epoch)."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.n // self.world) // self.batch_size

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        state = np.random.SeedSequence([int(self.seed), int(self.epoch), 0x5EED]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.n // self.world
        mine = self.order()[: per_rank * self.world][self.rank :: self.world]
        for b in range(self.start, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class _ShardedDeviceLoader:
    """A :class:`~dynconv.data.DeviceLoader` over global batches, each rank keeping its slice;
    ``set_epoch(epoch, start)`` skips ``start`` batches."""

    def __init__(self, loader, batch_size: int, rank: int, world: int) -> None:
        self.loader, self.batch_size, self.rank, self.world = loader, batch_size, rank, world
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.loader.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i < self.start:
                continue
            if self.world == 1:
                yield batch
            else:
                lo = self.rank * self.batch_size
                yield {k: v[lo : lo + self.batch_size] for k, v in batch.items()}



class _SamplerLoader:
    """A DataLoader over an :class:`EpochBatchSampler`; ``set_epoch`` sets both the sampler
    and the dataset (per-sample augmentation is seeded by ``(seed, epoch, index)``)."""

    def __init__(self, loader, sampler: EpochBatchSampler, dataset) -> None:
        self.loader, self.sampler, self.dataset = loader, sampler, dataset

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)



def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out




def train_loader(config: Config, dataset, device: torch.device, rank: int, world: int):
    """The training batches of this rank, with ``set_epoch(epoch, start)`` (resume at batch
    ``start`` of an epoch): a :class:`~dynconv.data.DeviceLoader` with ``data.device_cache``,
    else a DataLoader over an :class:`EpochBatchSampler`."""
    if config.data.device_cache:
        from ..data import DeviceLoader

        loader = DeviceLoader(
            dataset, config.train.batch_size * world, device, shuffle=True, seed=config.train.seed,
            augment="crop_flip" if getattr(dataset, "augment", True) else None, pad=int(getattr(dataset, "pad", 4)),
            drop_last=True,
        )
        return _ShardedDeviceLoader(loader, config.train.batch_size, rank, world)
    sampler = EpochBatchSampler(len(dataset), config.train.batch_size, seed=config.train.seed, rank=rank, world=world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator(),  # loaders draw their base seed from it, not the global RNG
    )
    return _SamplerLoader(loader, sampler, dataset)


def eval_loader(config: Config, dataset, rank: int, world: int) -> torch.utils.data.DataLoader:
    """This rank's share of the eval split (every ``world``-th example), in order."""
    indices = list(range(len(dataset)))[rank::world]
    return torch.utils.data.DataLoader(dataset, batch_size=config.eval.batch_size, sampler=indices,
                                       num_workers=config.data.num_workers, generator=torch.Generator())
