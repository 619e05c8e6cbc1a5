"""Datasets for the experiments: CIFAR-10 and image-folder classification, super-resolution
pairs with MATLAB-bicubic LR images, and scikit-image's bundled photos (the offline default).

Build by name with :func:`build_dataset`; items are dicts of tensors (see
``docs/design/experiments.md``). Nothing is downloaded: missing or malformed data raises
:class:`DatasetError` naming the path and the expected layout.
"""

from __future__ import annotations

from . import classification as _classification  # noqa: F401  (registers cifar10, image_folder)
from . import sr as _sr  # noqa: F401  (registers sr_folder, skimage_sr, skimage_photos, folder_crops)
from .bicubic import bicubic_resize
from .classification import Cifar10, ClassificationDataset, ImageFolder
from .device_loader import DeviceLoader
from .registry import DATASETS, DatasetError, build_dataset, register_dataset, sample_generator
from .skimage_photos import load_skimage_photo, skimage_photo_names
from .sr import PhotoCrops, SRDataset, make_lr, modcrop

__all__ = [
    "DATASETS",
    "DatasetError",
    "build_dataset",
    "register_dataset",
    "sample_generator",
    "DeviceLoader",
    "bicubic_resize",
    "skimage_photo_names",
    "load_skimage_photo",
    "Cifar10",
    "ClassificationDataset",
    "ImageFolder",
    "SRDataset",
    "PhotoCrops",
    "make_lr",
    "modcrop",
]
