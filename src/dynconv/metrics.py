"""Evaluation metrics, computed the way published numbers are.

Super-resolution papers report PSNR / SSIM on the luma channel of MATLAB's ``rgb2ycbcr``
(BT.601, studio range) with ``scale`` border pixels shaved, on images stored as uint8. So
:func:`psnr_y` / :func:`ssim_y` quantise to 8 bits, convert to Y, shave, and compute in
float64; :func:`ssim_y` reproduces ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255`` on the
same Y images (Wang et al.'s settings).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rgb_to_y", "psnr_y", "ssim_y", "ssim", "psnr", "accuracy", "topk_correct", "reconstruction_mse",
           "mean_absolute_error", "gaussian_window"]

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # MATLAB rgb2ycbcr, for RGB in [0, 1], output in [16, 235]


def _check_images(x: torch.Tensor, name: str, channels: int | None = 3) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        want = f"(N, {channels}, H, W)" if channels is not None else "(N, C, H, W)"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1], got {x.dtype}")


def _check_pair(sr: torch.Tensor, hr: torch.Tensor, shave: int) -> None:
    _check_images(sr, "sr")
    _check_images(hr, "hr")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if isinstance(shave, bool) or not isinstance(shave, int) or shave < 0:
        raise ValueError(f"shave must be an int >= 0, got {shave!r}")
    if min(hr.shape[-2:]) <= 2 * shave:
        raise ValueError(f"shave={shave} leaves nothing of images of size {tuple(hr.shape[-2:])}")


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` RGB in [0, 1] -> ``(..., 1, H, W)`` Y in [16, 235] / 255, as MATLAB's
    ``rgb2ycbcr`` (BT.601 studio range) divided by 255. Not rounded."""
    if img.dim() < 3 or img.shape[-3] != 3:
        raise ValueError(f"img must be (..., 3, H, W) RGB, got shape {tuple(img.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (16.0 + (img * w).sum(dim=-3, keepdim=True)) / 255.0


def _y255(img: torch.Tensor, shave: int, quantize: bool) -> torch.Tensor:
    """float64 ``(N, H', W')`` Y in [0, 255] units, borders shaved."""
    x = img.detach().to(torch.float64).clamp(0, 1)
    if quantize:
        x = (x * 255.0).round() / 255.0
    y = rgb_to_y(x)[:, 0] * 255.0
    if shave:
        y = y[:, shave:-shave, shave:-shave]
    return y


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-example PSNR ``(N,)`` in dB; ``inf`` where the images are equal."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.to(torch.float64) - y.to(torch.float64)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, shave: int, *, quantize: bool = True) -> torch.Tensor:
    """PSNR ``(N,)`` (float64, dB) on Y with ``shave`` border pixels removed.

    ``sr``, ``hr``: ``(N, 3, H, W)`` in [0, 1]; clamped and (``quantize``) rounded to 8-bit
    levels first, as the SR output would be saved as a PNG before a MATLAB evaluation."""
    _check_pair(sr, hr, shave)
    return psnr(_y255(sr, shave, quantize), _y255(hr, shave, quantize), data_range=255.0)


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter`` (truncate 3.5 gives
    radius 5 = an 11-tap window for sigma 1.5)."""
    r = (size - 1) / 2
    x = torch.arange(size, dtype=dtype, device=device) - r
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0, *, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM ``(N,)`` of ``(N, H, W)`` or ``(N, C, H, W)`` images (channels averaged).

    Like scikit-image with ``gaussian_weights=True, use_sample_covariance=False``: local
    statistics from a separable Gaussian (window ``2 * int(3.5 * sigma + 0.5) + 1``) and the
    mean over the pixels at least half a window from the border. Computing only those
    ("valid" convolution) gives the same values without scikit-image's reflect padding."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x[:, None], y[:, None]
    if x.dim() != 4:
        raise ValueError(f"x must be (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    size = 2 * int(3.5 * sigma + 0.5) + 1
    if min(x.shape[-2:]) < size:
        raise ValueError(f"images must be at least {size}x{size} for SSIM, got {tuple(x.shape[-2:])}")
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    n, c = x.shape[:2]
    g = gaussian_window(size, sigma, device=x.device)
    kernel_h = g.view(1, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(n * c, 1, *t.shape[-2:])
        return F.conv2d(F.conv2d(t, kernel_h), kernel_w)

    ux, uy = blur(x), blur(y)
    uxx, uyy, uxy = blur(x * x), blur(y * y), blur(x * y)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(dim=1)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, shave: int, *, quantize: bool = True) -> torch.Tensor:
    """SSIM ``(N,)`` (float64) on Y in [0, 255] units with ``shave`` border pixels removed
    (same preprocessing as :func:`psnr_y`)."""
    _check_pair(sr, hr, shave)
    return ssim(_y255(sr, shave, quantize), _y255(hr, shave, quantize), data_range=255.0)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Per example ``(N,)`` bool: is the label among the ``k`` highest logits (``k=1``: the
    argmax; ``k`` larger than the number of classes counts every class)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({logits.shape[0]},), got shape {tuple(labels.shape)}")
    if k == 1:
        return logits.argmax(dim=1) == labels
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy: the fraction (0-dim float tensor) of rows whose argmax is the label."""
    correct = topk_correct(logits, labels)
    if logits.shape[0] == 0:
        return torch.tensor(math.nan)
    return correct.float().mean()


def _difference(x: torch.Tensor, y: torch.Tensor, names: str) -> torch.Tensor:
    """``x - y`` in float32, flattened per example ``(N, -1)``."""
    if x.shape != y.shape:
        a, b = names.split()
        raise ValueError(f"{a} and {b} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (x.detach().float() - y.float()).flatten(1)


def reconstruction_mse(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-example MSE ``(N,)`` between a VQ-VAE reconstruction and its input."""
    return _difference(reconstruction, image, "reconstruction image").pow(2).mean(dim=1)


def mean_absolute_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example mean absolute difference ``(N,)`` (float32)."""
    return _difference(x, y, "x y").abs().mean(dim=1)
