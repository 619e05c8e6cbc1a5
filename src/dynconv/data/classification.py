"""Classification datasets: CIFAR-10 pickles and image folders (directory or tar archive).

Items are ``{"image": float32 (3, H, W) normalised, "label": int64 ()}``. Images are kept as
uint8 and normalised per item, and :meth:`ClassificationDataset.tensors` hands the whole
uint8 set to :class:`~dynconv.data.DeviceLoader`, which augments on the GPU.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import crop_flip
from .images import (IMAGE_EXTENSIONS, ImageRef, TarIndex, check_on_bad_file, image_to_tensor, is_archive, warn_skip_count,
                     warn_skipped)
from .registry import DatasetError, EpochMixin, register_dataset

__all__ = ["ClassificationDataset", "Cifar10", "ImageFolder", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _triple(value: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {value!r}")
    return values  # type: ignore[return-value]


class ClassificationDataset(EpochMixin, Dataset):
    """Shared item logic: uint8 image -> optional crop/flip -> normalise.

    Subclasses set ``classes``, ``labels`` (list of int) and implement ``load_uint8(i)``.
    """

    classes: list[str]
    labels: list[int]

    def __init__(
        self,
        *,
        augment: bool,
        pad: int = 4,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
    ) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        self.augment = bool(augment)
        self.pad = pad
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.seed = int(seed)
        self.epoch = 0
        self.skipped = 0

    def load_uint8(self, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] float ``(..., 3, H, W)`` -> normalised float32."""
        mean = torch.tensor(self.mean, device=img.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=img.device).view(3, 1, 1)
        return (img.float() / 255.0 - mean) / std

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        img = self.load_uint8(index)
        if self.augment:
            img = crop_flip(img, self.pad, self.generator(index))
        return {"image": self.normalise(img), "label": torch.tensor(self.labels[index], dtype=torch.int64)}

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one ``uint8 (N, 3, H, W)`` tensor and labels ``int64 (N,)``
        (decoded once; every image must have the same size)."""
        images = [self.load_uint8(i) for i in range(len(self))]
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1:
            raise DatasetError(f"{type(self).__name__}: images have different sizes {sorted(shapes)[:4]}; pass size=... to resize them")
        return torch.stack(images), torch.tensor(self.labels, dtype=torch.int64)


# -- CIFAR-10 pickles ---------------------------------------------------------------------------
CIFAR_LAYOUT = (
    "expected the 'cifar-10-batches-py' folder of the python CIFAR-10 release: data_batch_1 .. data_batch_5 "
    "and test_batch, each a pickled dict with b'data' uint8 (10000, 3072) and b'labels'"
)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    if not path.is_file():
        raise DatasetError(f"missing CIFAR-10 file {path}; {CIFAR_LAYOUT}")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = [int(v) for v in batch[b"labels"]]
    except Exception as exc:  # any unpickling / key / type problem is a malformed file
        raise DatasetError(f"malformed CIFAR-10 file {path} ({type(exc).__name__}: {exc}); {CIFAR_LAYOUT}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(labels):
        raise DatasetError(f"malformed CIFAR-10 file {path}: data shape {data.shape} with {len(labels)} labels; {CIFAR_LAYOUT}")
    if labels and not 0 <= min(labels) <= max(labels) <= 9:
        raise DatasetError(f"malformed CIFAR-10 file {path}: labels outside 0..9; {CIFAR_LAYOUT}")
    return data.reshape(-1, 3, 32, 32), labels


class Cifar10(ClassificationDataset):
    """CIFAR-10 from its ``cifar-10-batches-py`` pickle folder (``root`` is that folder or
    its parent), all 32x32 images held in memory as one uint8 tensor."""

    def __init__(self, root: str | Path, split: str, **kwargs) -> None:
        super().__init__(**kwargs)
        root = Path(root).expanduser()
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        if not root.is_dir():
            raise DatasetError(f"CIFAR-10 root {root} is not a directory; {CIFAR_LAYOUT}")
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if split not in files:
            raise ValueError(f"split must be 'train' or 'test' for cifar10, got {split!r}")
        parts = [_load_cifar_batch(root / name) for name in files[split]]
        self.images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        self.labels = [label for p in parts for label in p[1]]
        self.classes = list(CIFAR10_CLASSES)
        self.root = root

    def load_uint8(self, index: int) -> torch.Tensor:
        return self.images[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, torch.tensor(self.labels, dtype=torch.int64)


# -- image folders ------------------------------------------------------------------------------
def _folder_layout(split: str) -> str:
    return (
        f"expected root to be a directory holding '{split}/<class>/<image>' (or '{split}.tar' / '{split}.tar.gz' "
        f"of that), or a .tar/.tar.gz archive whose members are '[prefix/]{split}/<class>/<image>'; "
        f"images: {', '.join(IMAGE_EXTENSIONS)}"
    )


def _index_image_folder(root: Path, split: str) -> tuple[list[ImageRef], list[str], str]:
    """``(refs, class names per ref, where)`` for ``split`` under ``root``."""
    layout = _folder_layout(split)
    if root.is_dir() and not (root / split).is_dir():
        for name in (f"{split}.tar.gz", f"{split}.tgz", f"{split}.tar"):
            if (root / name).is_file():
                root = root / name
                break
    if root.is_dir():
        folder = root / split
        refs, classes = [], []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    refs.append(ImageRef(source=str(path), path=path))
                    classes.append(class_dir.name)
        return refs, classes, str(folder)
    if root.is_file() and is_archive(root):
        archive = TarIndex(root)
        pairs = []
        for member in archive.members:
            parts = member.split("/")
            if len(parts) >= 3 and parts[-3] == split:
                pairs.append((parts[-2], member))
        pairs.sort()
        return [archive.ref(m) for _, m in pairs], [c for c, _ in pairs], str(root)
    if not root.exists():
        raise DatasetError(f"image folder root {root} does not exist; {layout}")
    raise DatasetError(f"image folder root {root} is neither a directory nor a .tar/.tar.gz archive; {layout}")


class ImageFolder(ClassificationDataset):
    """``split/<class>/*.jpg|png`` from a directory or an archive; classes sorted by name.

    ``size`` resizes every image to ``size x size`` (bicubic) so items can be batched.
    ``on_bad_file='skip'`` decodes every file once at construction, drops unreadable ones
    and counts them in ``skipped``; ``'error'`` decodes lazily and fails naming the file.
    ``preload`` keeps the decoded uint8 images in memory (small datasets).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        size: int | None = None,
        on_bad_file: str = "error",
        preload: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_on_bad_file(on_bad_file)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be None or an int >= 1, got {size!r}")
        self.size = size
        refs, class_names, where = _index_image_folder(Path(root).expanduser(), split)
        if not refs:
            raise DatasetError(f"no images found for split {split!r} in {where}; {_folder_layout(split)}")
        self.classes = sorted(set(class_names))
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.refs = refs
        self.labels = [class_index[name] for name in class_names]
        self.where = where
        self._cache: list[torch.Tensor] | None = None
        if on_bad_file == "skip" or preload:
            decoded, keep = [], []
            for i, ref in enumerate(self.refs):
                try:
                    img = self._decode(ref)
                except DatasetError as error:
                    if on_bad_file == "error":
                        raise
                    self.skipped += 1
                    warn_skipped(ref.source, error)
                    continue
                keep.append(i)
                if preload:
                    decoded.append(img)
            warn_skip_count(self.skipped, len(self.refs), f"{where} ({split})")
            self.refs = [self.refs[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            if preload:
                self._cache = decoded
            if not self.refs:
                raise DatasetError(f"every image for split {split!r} in {where} is unreadable ({self.skipped} skipped)")

    def _decode(self, ref: ImageRef) -> torch.Tensor:
        array = ref.decode()
        if self.size is not None and array.shape[:2] != (self.size, self.size):
            from PIL import Image

            array = np.asarray(Image.fromarray(array).resize((self.size, self.size), Image.BICUBIC))
        return image_to_tensor(array)

    def load_uint8(self, index: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[index]
        return self._decode(self.refs[index])


# -- registry entries ---------------------------------------------------------------------------
@register_dataset("cifar10")
def build_cifar10(
    split: str,
    *,
    root: str | Path,
    augment: bool | None = None,
    pad: int = 4,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    seed: int = 0,
    on_bad_file: str = "error",
) -> Cifar10:
    """CIFAR-10 pickles; ``augment`` (crop with ``pad`` + flip) defaults to on for 'train'.
    ``on_bad_file`` is accepted for a uniform config; a malformed pickle always fails."""
    check_on_bad_file(on_bad_file)
    augment = split == "train" if augment is None else augment
    return Cifar10(root, split, augment=augment, pad=pad, mean=mean, std=std, seed=seed)


@register_dataset("image_folder")
def build_image_folder(
    split: str,
    *,
    root: str | Path,
    augment: bool | None = None,
    pad: int = 4,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    seed: int = 0,
    size: int | None = None,
    on_bad_file: str = "error",
    preload: bool = False,
) -> ImageFolder:
    """Image-folder classification (e.g. ``../shared/data/cifar10-jpeg``). Normalised with
    CIFAR-10's statistics unless ``mean`` / ``std`` are given."""
    augment = split == "train" if augment is None else augment
    return ImageFolder(
        root, split, size=size, on_bad_file=on_bad_file, preload=preload, augment=augment, pad=pad, mean=mean, std=std, seed=seed
    )
