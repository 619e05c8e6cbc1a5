"""Backend selection for the ops: one place that decides which implementation runs."""

from __future__ import annotations

import functools

import torch

#: The backend names each family of ops (and its layers) accepts.
SWITCHED_BACKENDS = ("auto", "reference", "gather", "triton")
MIXTURE_BACKENDS = ("auto", "reference", "cpu", "triton")  # cond_conv2d, involution2d


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports and can launch: on CUDA, or through its CPU interpreter."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def check_backend(backend: str, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    return backend


def triton_usable_on(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    import os

    if not triton_available():
        return False
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def auto_backend(x: torch.Tensor, registered) -> str:
    """``'auto'`` for ops with 'cpu'/'triton' backends: triton on CUDA, the CPU path on
    CPU, the reference where neither is registered (e.g. triton missing on a GPU box)."""
    if x.is_cuda:
        return "triton" if "triton" in registered else "reference"
    return "cpu" if "cpu" in registered else "reference"
