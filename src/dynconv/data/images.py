"""Image files from a directory or a .tar / .tar.gz archive, decoded with Pillow.

Archives are indexed once: an uncompressed .tar by member offsets (read lazily, one
``open`` per read so forked loader workers never share a file position), a compressed one
by reading the member bytes into memory in one sequential pass (random access into gzip
would decompress from the start every time). Decoding is lazy, per item.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .registry import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "ImageRef", "decode_image", "image_to_tensor", "list_image_files", "TarIndex", "check_on_bad_file",
           "rgb_float", "rgb_uint8", "warn_skipped"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
OnBadFile = Literal["error", "skip"]


def check_on_bad_file(value: str) -> str:
    if value not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {value!r}")
    return value


def warn_skipped(source: str, reason: object) -> None:
    """``on_bad_file='skip'``: say which file is left out and why (never silently)."""
    why = str(reason) if source in str(reason) else f"{source}: {reason}"
    warnings.warn(f"data.on_bad_file=skip: skipped {why}", UserWarning, stacklevel=3)


def warn_skip_count(skipped: int, total: int, where: str) -> None:
    if skipped:
        warnings.warn(f"data.on_bad_file=skip: skipped {skipped} of {total} image file(s) in {where}", UserWarning, stacklevel=3)


# Integer modes Pillow decodes >8-bit greyscale to (16-bit PNG / TIFF): values up to 65535.
# ``Image.convert('RGB')`` clips them at 255, turning a 16-bit image almost white.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WIDE_MAX = 65535.0


def rgb_float(image) -> np.ndarray:
    """A PIL image as float32 ``(H, W, 3)`` RGB in [0, 1], 16-bit images at full precision."""
    if image.mode in _WIDE_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64) / _WIDE_MAX, 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def rgb_uint8(image) -> np.ndarray:
    """A PIL image as a writable uint8 ``(H, W, 3)`` RGB array; 16-bit images are scaled to
    8 bits (``round(v / 257)``), not clipped."""
    if image.mode in _WIDE_MODES:
        grey = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0.0, _WIDE_MAX) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def decode_image(data: bytes | Path, source: str) -> np.ndarray:
    """Decode to a ``uint8`` ``(H, W, 3)`` RGB array; an unreadable file raises
    :class:`DatasetError` naming ``source``."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with matplotlib / scikit-image
        raise ImportError("decoding images needs Pillow: pip install pillow") from exc
    try:
        stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
        with stream, Image.open(stream) as image:
            image.load()
            array = rgb_uint8(image)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for bad/truncated data
        raise DatasetError(f"cannot decode image file {source}: {exc}") from exc
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise DatasetError(f"image file {source} decoded to shape {array.shape}, expected (H, W, 3)")
    return array


def image_size(data: bytes | Path, source: str) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header (no decoding); raises
    :class:`DatasetError` naming ``source`` if it is not an image."""
    from PIL import Image

    try:
        stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
        with stream, Image.open(stream) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image file {source}: {exc}") from exc
    return height, width


def image_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> ``uint8 (3, H, W)`` (contiguous; numpy transposes uint8 much
    faster than torch's CPU permute-copy)."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def list_image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a file path, or a member of an indexed archive."""

    source: str  # a printable path (archive members as ``archive.tar.gz::member``)
    path: Path | None = None
    archive: "TarIndex | None" = None
    member: str | None = None

    def read(self) -> bytes | Path:
        if self.archive is not None:
            assert self.member is not None
            return self.archive.read(self.member)
        assert self.path is not None
        return self.path

    def decode(self) -> np.ndarray:
        return decode_image(self.read(), self.source)

    def size(self) -> tuple[int, int]:
        """``(H, W)`` from the file header, without decoding."""
        return image_size(self.read(), self.source)


class TarIndex:
    """Image members of a tar archive: offsets (.tar) or bytes in memory (.tar.gz)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.compressed = not self.path.name.lower().endswith(".tar")
        self.members: list[str] = []
        self._offsets: dict[str, tuple[int, int]] = {}
        self._data: dict[str, bytes] = {}
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for info in tar:
                    if not info.isfile() or not info.name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    name = info.name[2:] if info.name.startswith("./") else info.name
                    self.members.append(name)
                    if self.compressed:
                        handle = tar.extractfile(info)
                        assert handle is not None
                        self._data[name] = handle.read()
                    else:
                        self._offsets[name] = (info.offset_data, info.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"cannot read archive {self.path}: {exc}") from exc

    def read(self, member: str) -> bytes:
        if self.compressed:
            return self._data[member]
        offset, size = self._offsets[member]
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def ref(self, member: str) -> ImageRef:
        return ImageRef(source=f"{self.path}::{member}", archive=self, member=member)
