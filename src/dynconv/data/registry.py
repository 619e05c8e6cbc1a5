"""Dataset registry, the error type and per-sample random generators.

Every dataset is built by name (``build_dataset(name, split, **options)``) so configs and
the CLI stay plain data. Randomness comes only from :func:`sample_generator`, seeded from
``(seed, epoch, index)``: a resumed run, or a different number of loader workers, sees
exactly the same samples.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import Registry

__all__ = ["DatasetError", "DATASETS", "register_dataset", "build_dataset", "sample_generator", "EpochMixin"]

#: name -> ``factory(split, **options) -> Dataset``.
DATASETS = Registry("dataset", positional=("split",))

F = TypeVar("F", bound=Callable[..., Dataset])


class DatasetError(ValueError):
    """Missing or malformed data: the message names the path and the expected layout."""


def register_dataset(name: str) -> Callable[[F], F]:
    """Decorator: register ``factory(split, **options) -> Dataset`` under ``name``."""
    return DATASETS.register(name)


def build_dataset(name: str, split: str, **options: Any) -> Dataset:
    """The dataset ``name`` for ``split`` ('train' / 'test' / ...); options per dataset."""
    DATASETS.get(name)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str such as 'train' or 'test', got {split!r}")
    return DATASETS.build(name, split, **options)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, index)`` (well mixed, so nearby tuples
    give unrelated streams); the only source of randomness inside datasets."""
    for arg, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{arg} must be an int >= 0, got {value!r}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class EpochMixin:
    """``seed`` / ``epoch`` bookkeeping shared by datasets with random augmentation."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` returns (call before each epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        return sample_generator(self.seed, self.epoch, index)
