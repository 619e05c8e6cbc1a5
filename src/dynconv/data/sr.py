"""Super-resolution pairs made from HR images, the standard benchmark way.

HR is cropped to a multiple of ``scale`` (modcrop); LR is MATLAB-bicubic downsampling of the
whole HR image (:func:`bicubic_resize`), rounded to uint8 levels as stored benchmark LR
images are. Training items are aligned random crops (``patch_size`` HR pixels) with flips
and 90-degree rotations from the per-sample generator; evaluation items are whole images
(use batch size 1). Also: reconstruction crops of the bundled photos (``skimage_photos``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .augment import dihedral, randint, random_sr_crop
from .bicubic import bicubic_resize
from .images import IMAGE_EXTENSIONS, ImageRef, check_on_bad_file, image_to_tensor, list_image_files, warn_skip_count, warn_skipped
from .registry import DatasetError, EpochMixin, register_dataset
from .skimage_photos import skimage_photo_names, skimage_photo_path

__all__ = ["SRDataset", "PhotoCrops", "make_lr", "modcrop"]


def modcrop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop ``(..., H, W)`` at the bottom/right to multiples of ``scale``."""
    h, w = hr.shape[-2:]
    return hr[..., : h - h % scale, : w - w % scale]


def make_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 HR ``(3, H, W)`` (H, W multiples of scale) -> uint8 LR by MATLAB bicubic."""
    lr = bicubic_resize(hr.float()[None] / 255.0, 1.0 / scale)[0]
    return (lr * 255.0).round().clamp(0, 255).to(torch.uint8)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or scale not in (2, 3, 4):
        raise ValueError(f"scale must be 2, 3 or 4, got {scale!r}")
    return scale


class SRDataset(EpochMixin, Dataset):
    """``{"lr": float32 (3, h, w), "hr": float32 (3, h*s, w*s)}`` in [0, 1] from HR images.

    ``patch_size`` (HR pixels, a multiple of ``scale``) gives random aligned crops; ``None``
    gives whole images. ``augment`` (default: on when cropping) adds flips and rotations.
    ``repeat`` lists each image that many times per epoch (a few large images make a short
    epoch otherwise). ``cache`` keeps decoded HR and LR uint8 images in memory.
    """

    def __init__(
        self,
        refs: list[ImageRef],
        *,
        scale: int = 2,
        patch_size: int | None = None,
        augment: bool | None = None,
        repeat: int = 1,
        seed: int = 0,
        cache: bool = True,
        on_bad_file: str = "error",
        where: str = "",
    ) -> None:
        self.scale = _check_scale(scale)
        if patch_size is not None:
            if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < scale or patch_size % scale:
                raise ValueError(f"patch_size must be None or a positive multiple of scale={scale}, got {patch_size!r}")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
        check_on_bad_file(on_bad_file)
        self.patch_size = patch_size
        self.augment = patch_size is not None if augment is None else bool(augment)
        self.repeat = repeat
        self.seed = int(seed)
        self.epoch = 0
        self.cache = bool(cache)
        self.on_bad_file = on_bad_file
        self.skipped = 0
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not refs:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}")
        self.refs = list(refs)
        if on_bad_file == "skip" or cache:
            kept = []
            for ref in self.refs:
                try:
                    pair = self._make_pair(ref)
                except DatasetError as error:
                    if on_bad_file == "error":
                        raise
                    self.skipped += 1
                    warn_skipped(ref.source, error)
                    continue
                kept.append(ref)
                if cache:
                    self._pairs[len(kept) - 1] = pair
            warn_skip_count(self.skipped, len(self.refs), where)
            self.refs = kept
            if not self.refs:
                raise DatasetError(f"every image in {where} is unreadable or too small ({self.skipped} skipped)")

    def _make_pair(self, ref: ImageRef) -> tuple[torch.Tensor, torch.Tensor]:
        hr = image_to_tensor(ref.decode())
        if min(hr.shape[-2:]) < self.scale:
            raise DatasetError(f"image {ref.source} is {hr.shape[-2]}x{hr.shape[-1]}, smaller than scale={self.scale}")
        hr = modcrop(hr, self.scale)
        if self.patch_size is not None and min(hr.shape[-2:]) < self.patch_size:
            raise DatasetError(f"image {ref.source} is {tuple(hr.shape[-2:])} after modcrop, smaller than patch_size={self.patch_size}")
        return make_lr(hr, self.scale), hr.contiguous()

    def pair(self, image_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(lr, hr)`` of image ``image_index`` (whole, modcropped)."""
        if image_index in self._pairs:
            return self._pairs[image_index]
        return self._make_pair(self.refs[image_index])

    def hr_sizes(self) -> list[tuple[str, tuple[int, int]]]:
        """``(source, (H, W))`` of every image's HR version (cropped to a multiple of
        ``scale``): from the cache, else from the file header (no decoding), so a trainer can
        check every item's size before the first step."""
        sizes = []
        for i, ref in enumerate(self.refs):
            if i in self._pairs:
                h, w = self._pairs[i][1].shape[-2:]
            else:
                h, w = ref.size()
                h, w = h - h % self.scale, w - w % self.scale
            sizes.append((ref.source, (int(h), int(w))))
        return sizes

    @property
    def names(self) -> list[str]:
        return [Path(ref.source.split("::")[-1]).stem for ref in self.refs]

    def __len__(self) -> int:
        return len(self.refs) * self.repeat

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        lr, hr = self.pair(index % len(self.refs))
        gen = self.generator(index) if self.patch_size is not None or self.augment else None
        if self.patch_size is not None:
            lr, hr = random_sr_crop(lr, hr, self.scale, self.patch_size, gen)
        lr, hr = lr.float() / 255.0, hr.float() / 255.0  # before flips: torch copies uint8 views slowly
        if self.augment:
            lr, hr = dihedral([lr, hr], gen)
        return {"lr": lr, "hr": hr}


@register_dataset("sr_folder")
def build_sr_folder(
    split: str,
    *,
    root: str | Path,
    scale: int = 2,
    patch_size: int | None = None,
    augment: bool | None = None,
    repeat: int = 1,
    seed: int = 0,
    cache: bool = True,
    on_bad_file: str = "error",
) -> SRDataset:
    """HR images directly inside ``root`` (e.g. ``sr/train/T91``, ``sr/test/Set5``); if
    ``root/split`` is a folder, that is used. ``split`` only picks defaults otherwise."""
    folder = Path(root).expanduser()
    layout = f"expected a folder of HR images ({', '.join(IMAGE_EXTENSIONS)})"
    if (folder / split).is_dir():
        folder = folder / split
    if not folder.is_dir():
        raise DatasetError(f"SR root {folder} is not a directory; {layout}")
    refs = [ImageRef(source=str(p), path=p) for p in list_image_files(folder)]
    if not refs:
        raise DatasetError(f"no images in SR root {folder}; {layout}")
    return SRDataset(
        refs, scale=scale, patch_size=patch_size, augment=augment, repeat=repeat, seed=seed, cache=cache, on_bad_file=on_bad_file, where=str(folder)
    )


def _no_root(name: str, root: object) -> None:
    # configs may pass data.root to every dataset; the bundled photos have a fixed location
    if root is not None:
        raise ValueError(f"{name} reads the photos bundled with scikit-image and takes no root, got root={root!r}; use sr_folder for a folder")


@register_dataset("skimage_sr")
def build_skimage_sr(
    split: str,
    *,
    root: str | Path | None = None,
    scale: int = 2,
    patch_size: int | None = None,
    augment: bool | None = None,
    repeat: int = 1,
    seed: int = 0,
    cache: bool = True,
    on_bad_file: str = "error",
) -> SRDataset:
    """SR pairs from scikit-image's bundled photos: 'train' or 'test' by name."""
    _no_root("skimage_sr", root)
    refs = []
    for name in skimage_photo_names(split):
        path = skimage_photo_path(name)
        refs.append(ImageRef(source=str(path), path=path))
    return SRDataset(
        refs, scale=scale, patch_size=patch_size, augment=augment, repeat=repeat, seed=seed, cache=cache, on_bad_file=on_bad_file, where="skimage/data"
    )


class PhotoCrops(EpochMixin, Dataset):
    """Reconstruction items ``{"image": float32 (3, size, size)}`` from photos: in [0, 1], or
    ``(x - mean) / std`` when those are given.

    Train: random crops (with flips / rotations), as many per epoch as the photos hold
    non-overlapping tiles, times ``repeat``. Test: every non-overlapping tile, raster order.
    """

    def __init__(self, photos: list[torch.Tensor], *, size: int, train: bool, augment: bool, repeat: int = 1, seed: int = 0,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values (R, G, B), std > 0, got mean={mean}, std={std}")
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)
        self._normalise = mean != (0.0, 0.0, 0.0) or std != (1.0, 1.0, 1.0)
        small = [tuple(p.shape[-2:]) for p in photos if min(p.shape[-2:]) < size]
        if small:
            raise ValueError(f"size={size} is larger than photos of shape {small}")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
        self.photos = photos
        self.size = size
        self.train = train
        self.augment = augment
        self.repeat = repeat
        self.seed = int(seed)
        self.epoch = 0
        self.skipped = 0
        self.tiles = [
            (i, y, x)
            for i, p in enumerate(photos)
            for y in range(0, p.shape[-2] - size + 1, size)
            for x in range(0, p.shape[-1] - size + 1, size)
        ]
        # sample photos by tile count (area) when cropping at random
        self._photo_of_item = [t[0] for t in self.tiles]

    def __len__(self) -> int:
        return len(self.tiles) * (self.repeat if self.train else 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        if not self.train:
            i, y, x = self.tiles[index]
            crop = self.photos[i][:, y : y + self.size, x : x + self.size]
            return {"image": self._scaled(crop.float() / 255.0)}
        gen = self.generator(index)
        photo = self.photos[self._photo_of_item[index % len(self.tiles)]]
        y = randint(photo.shape[-2] - self.size + 1, gen)
        x = randint(photo.shape[-1] - self.size + 1, gen)
        crop = photo[:, y : y + self.size, x : x + self.size].float() / 255.0
        if self.augment:
            (crop,) = dihedral([crop], gen)
        return {"image": self._scaled(crop)}

    def _scaled(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self._mean) / self._std if self._normalise else image


@register_dataset("skimage_photos")
def build_skimage_photos(
    split: str, *, root: str | Path | None = None, size: int = 64, augment: bool | None = None, repeat: int = 1, seed: int = 0, on_bad_file: str = "error"
) -> PhotoCrops:
    """The bundled photos as reconstruction (VQ-VAE) items; ``size`` is the crop side."""
    _no_root("skimage_photos", root)
    check_on_bad_file(on_bad_file)
    photos = []
    for name in skimage_photo_names(split):
        path = skimage_photo_path(name)
        photos.append(image_to_tensor(ImageRef(source=str(path), path=path).decode()))
    train = split == "train"
    return PhotoCrops(photos, size=size, train=train, augment=train if augment is None else bool(augment), repeat=repeat, seed=seed)


@register_dataset("folder_crops")
def build_folder_crops(
    split: str,
    *,
    root: str | Path,
    size: int = 64,
    holdout_every: int = 10,
    augment: bool | None = None,
    repeat: int = 1,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    on_bad_file: str = "error",
) -> PhotoCrops:
    """Reconstruction (VQ-VAE) crops of the photos directly in ``root`` (e.g. ``sr/train/T91``),
    split by photo so no eval crop comes from a training photo: sorted by file name, every
    ``holdout_every``-th photo (the 10th, 20th, ... by default) is the ``'test'`` split, the
    others ``'train'``. Train: random ``size`` x ``size`` crops with flips and rotations
    (``augment``, default on), ``repeat`` x the photos' tile count per epoch; test: every
    non-overlapping tile of the held-out photos, in order. Pixels in [0, 1], or
    ``(x - mean) / std``. Photos smaller than ``size`` are an error (``on_bad_file='skip'``
    leaves unreadable or too small ones out, with a warning)."""
    check_on_bad_file(on_bad_file)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (the held-out photos) for folder_crops, got {split!r}")
    if isinstance(holdout_every, bool) or not isinstance(holdout_every, int) or holdout_every < 2:
        raise ValueError(f"holdout_every must be an int >= 2 (every n-th photo is held out), got {holdout_every!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"folder_crops root {folder} is not a directory; expected a folder of photos "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
    files = list_image_files(folder)
    held_out = [i % holdout_every == holdout_every - 1 for i in range(len(files))]
    chosen = [f for f, out in zip(files, held_out) if out == (split == "test")]
    if not chosen:
        raise DatasetError(f"folder_crops: no {split} photos in {folder} ({len(files)} photo(s), every "
                           f"{holdout_every}th held out)")
    photos, kept, skipped = [], [], 0
    for path in chosen:
        ref = ImageRef(source=str(path), path=path)
        try:
            photo = image_to_tensor(ref.decode())
            if min(photo.shape[-2:]) < size:
                raise DatasetError(f"image {path} is {photo.shape[-2]}x{photo.shape[-1]}, smaller than size={size}")
        except DatasetError as error:
            if on_bad_file == "error":
                raise
            skipped += 1
            warn_skipped(ref.source, error)
            continue
        photos.append(photo)
        kept.append(path.stem)
    warn_skip_count(skipped, len(chosen), str(folder))
    if not photos:
        raise DatasetError(f"folder_crops: every {split} photo in {folder} is unreadable or smaller than size={size}")
    train = split == "train"
    dataset = PhotoCrops(photos, size=size, train=train, augment=train if augment is None else bool(augment),
                         repeat=repeat, seed=seed, mean=mean, std=std)
    dataset.skipped = skipped
    dataset.names = kept  # the photos' file stems, in order
    return dataset
