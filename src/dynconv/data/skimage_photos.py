"""The colour photos bundled inside scikit-image's package folder: the embedded default data.

Only files already in the installed ``skimage/data/`` folder are used (never the pooch
downloads), so the demo and the tests run offline. The split is fixed by name; astronaut
and coffee are held out (as in ``dynconv.demo``); the motorcycle stereo pair shows one
scene, so both halves stay on the training side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .images import decode_image, image_to_tensor
from .registry import DatasetError

__all__ = ["SKIMAGE_PHOTOS", "SKIMAGE_SPLITS", "skimage_data_dir", "skimage_photo_names", "skimage_photo_path", "load_skimage_photo"]

# name (as in skimage.data) -> file inside skimage/data
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
SKIMAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("chelsea", "hubble_deep_field", "immunohistochemistry", "motorcycle_left", "motorcycle_right", "retina", "rocket"),
    "test": ("astronaut", "coffee"),
}


def skimage_data_dir() -> Path:
    """The installed ``skimage/data`` folder (raises naming the fix if scikit-image is absent)."""
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("the bundled photos need scikit-image: pip install scikit-image") from exc
    return Path(skimage.data.__file__).parent


def skimage_photo_names(split: str | None = None) -> list[str]:
    """All bundled photo names (sorted), or those of ``split`` ('train' / 'test')."""
    if split is None:
        return sorted(SKIMAGE_PHOTOS)
    if split not in SKIMAGE_SPLITS:
        raise ValueError(f"split must be None or one of {sorted(SKIMAGE_SPLITS)}, got {split!r}")
    return list(SKIMAGE_SPLITS[split])


def skimage_photo_path(name: str) -> Path:
    if name not in SKIMAGE_PHOTOS:
        raise ValueError(f"unknown bundled photo {name!r}; names: {sorted(SKIMAGE_PHOTOS)}")
    path = skimage_data_dir() / SKIMAGE_PHOTOS[name]
    if not path.is_file():
        raise DatasetError(
            f"{path} is not in the installed scikit-image package (expected the bundled file "
            f"{SKIMAGE_PHOTOS[name]!r} in skimage/data); nothing is downloaded"
        )
    return path


def load_skimage_photo(name: str) -> torch.Tensor:
    """A bundled photo as ``float32 (3, H, W)`` in [0, 1]."""
    path = skimage_photo_path(name)
    return image_to_tensor(decode_image(path, str(path))).float() / 255.0
