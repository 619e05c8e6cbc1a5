"""Argument checks shared by layers and ops: every error names the argument, the
expected and the received value, so a misconfigured model fails where it is built."""

from __future__ import annotations

from typing import Iterable

import torch

IntPair = tuple[int, int]


def pair(value: int | Iterable[int], name: str, *, minimum: int = 0) -> IntPair:
    """Turn an int or a 2-sequence into a pair of ints >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        result = (value, value)
    else:
        try:
            result = tuple(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(result) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in result):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result  # type: ignore[return-value]


def positive_int(value: int, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def choice(value: str, name: str, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


#: the layout a float input of each rank has (for error messages)
LAYOUTS = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def float_input(x: torch.Tensor, name: str = "x", *, ndim: int = 4, channels: int | None = None) -> None:
    """Check a float feature map: ``ndim`` dims, floating dtype, ``channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        layout = LAYOUTS.get(ndim, "")
        raise ValueError(f"{name} must be {ndim}-D {layout}".rstrip() + f", got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1), got {x.shape[1]} (shape {tuple(x.shape)})")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
