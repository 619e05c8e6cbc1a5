"""MATLAB ``imresize`` (bicubic) for float tensors.

Super-resolution benchmarks are defined with MATLAB's ``imresize``: LR images are made with
it and published PSNRs are measured against it. PyTorch's ``interpolate(mode='bicubic')``
differs (a = -0.75 and no antialiasing by default; with ``antialias=True`` it truncates the
kernel at the borders instead of mirroring), so a model trained on its LR images is evaluated
on a different degradation. This is a port of MATLAB's algorithm (``contributions`` in
``imresize.m``): Keys cubic kernel with a = -0.5, widened by ``1/scale`` when downscaling
(antialiasing), input indices mirrored at the borders (``[1:n, n:-1:1]``), zero-weight taps
dropped. Each dimension becomes an ``(out, in)`` weight matrix, so a resize is two matmuls
(height, then width, like MATLAB when both scales are equal); the matrices are cached.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["bicubic_resize", "cubic", "resize_weights", "resize_matrix"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def resize_weights(in_length: int, out_length: int, scale: float, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's ``contributions``: ``(weights, indices)``, both ``(out_length, taps)``.

    ``indices`` are 0-based input positions after MATLAB's mirroring; rows of ``weights``
    sum to 1. Returned in float64 so tests can compare against hand-computed values.
    """
    if in_length < 1 or out_length < 1:
        raise ValueError(f"lengths must be >= 1, got in_length={in_length}, out_length={out_length}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel_width = kernel_width / scale

        def kernel(d: np.ndarray) -> np.ndarray:
            return scale * cubic(scale * d)

    else:
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    # Output-space 0.5 maps to input-space 0.5, and 0.5 + scale to 1.5 (1-based, as MATLAB).
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Mirror out-of-range indices: aux = [1:n, n:-1:1]; idx = aux(mod(idx - 1, 2n) + 1).
    aux = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = aux[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


@lru_cache(maxsize=64)
def _matrix_f64(in_length: int, out_length: int, scale: float, antialias: bool) -> torch.Tensor:
    weights, indices = resize_weights(in_length, out_length, scale, antialias)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.repeat(np.arange(out_length), weights.shape[1])
    np.add.at(matrix, (rows, indices.reshape(-1)), weights.reshape(-1))  # mirrored taps add up
    return torch.from_numpy(matrix)


def resize_matrix(
    in_length: int, out_length: int, scale: float, antialias: bool = True, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``(out_length, in_length)`` matrix ``M`` with ``resized = M @ signal``."""
    return _matrix_f64(int(in_length), int(out_length), float(scale), bool(antialias)).to(dtype=dtype, device=device)


def _output_length(length: int, scale: float) -> int:
    # MATLAB: ceil(length * scale). Round first so 1/3 * 255 = 84.99999999999999 gives 85.
    return max(1, int(math.ceil(round(length * scale, 9))))


def bicubic_resize(
    img: torch.Tensor, scale: float, *, antialias: bool = True, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize ``img`` ``(..., C, H, W)`` (float) like MATLAB ``imresize(img, scale, 'bicubic')``.

    The output is ``(..., C, ceil(H*scale), ceil(W*scale))`` (or ``out_size``, with ``scale``
    still setting the kernel, as MATLAB does when both are known). Values are not clamped
    or rounded: quantise afterwards where a pipeline stores uint8 images.
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
    if img.dim() < 2:
        raise ValueError(f"img must be (..., H, W) with at least 2 dims, got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"img must have a floating dtype (convert uint8 with .float() / 255), got {img.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    h, w = img.shape[-2:]
    if out_size is None:
        out_h, out_w = _output_length(h, scale), _output_length(w, scale)
    else:
        out_h, out_w = (int(v) for v in out_size)
    compute = torch.float64 if img.dtype == torch.float64 else torch.float32
    x = img.to(compute)
    mh = resize_matrix(h, out_h, scale, antialias, dtype=compute, device=img.device)
    mw = resize_matrix(w, out_w, scale, antialias, dtype=compute, device=img.device)
    x = torch.matmul(mh, x)  # (out_h, H) @ (..., H, W): height first, as MATLAB
    x = torch.matmul(x, mw.T)  # (..., out_h, W) @ (W, out_w)
    return x.to(img.dtype)
