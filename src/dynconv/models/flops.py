"""Parameters and FLOPs per output pixel, counted with forward hooks on one example forward.

Definition (what every number in the reports means)::

    flops_per_pixel = 2 * (multiply-adds of the whole forward) / (N * H_out * W_out)

``H_out x W_out`` is the spatial size of the model's image output (SR: the HR image; VQ-VAE:
the reconstruction). For a classifier (a 2-D output) it is the *input's* ``H x W``. Per pixel,
not per image, so SR nets of different scales and inputs of different sizes compare directly.

Counted (multiply-adds of weights; biases, activations, normalisation, pooling, additions,
pixel shuffle and interpolation are not counted, the usual convention):

* ``nn.Conv1d/2d/3d``: ``out.numel() * in/groups * prod(kernel)``; transposed convs:
  ``in.numel() * out/groups * prod(kernel)``; ``nn.Linear``: ``out.numel() * in_features``.
* ``SwitchedConv2d`` at its active cost: hard routing = ONE expert's conv (plus its selector,
  counted through the selector's own modules); soft routing = every expert plus the per-pixel
  mix (``breadth`` multiply-adds per output value).
* ``CondConv2d`` / ``CondLinear``: one conv (or linear) plus the per-example kernel mixing
  (``num_experts * (kernel + bias)``) plus the router (an ``nn.Linear``, hooked).
* ``Involution2d``: applying the generated kernels (``K*K`` per output value) plus kernel
  generation (its 1x1 convs, hooked).
* ``LambdaLayer``: its content and positional lambdas (the einsums) plus its convs (hooked).
* Any module with ``count_macs(inputs, output) -> int`` (its own work, children excluded),
  e.g. the VQ-VAE's quantiser. Other functional math is not seen by hooks.

Per-example costs (CondConv mixing and routing) are spread over the pixels, so their share
shrinks with the input size: give the input size the number is meant for.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..nn.cond_conv import CondConv2d, CondLinear
from ..nn.involution import Involution2d
from ..nn.selectors import LambdaLayer
from ..nn.switched_conv import SwitchedConv2d

__all__ = ["count_parameters", "flops_per_pixel", "model_summary", "layer_macs"]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once; every expert of a dynamic layer counts: they
    are stored, even if only one runs per pixel)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _first(inputs: tuple) -> torch.Tensor:
    return inputs[0]


def _switched_macs(m: SwitchedConv2d, inputs: tuple, output: torch.Tensor) -> int:
    per_value = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    if m.breadth == 1 or m.routing == "hard":
        return output.numel() * per_value
    return output.numel() * m.breadth * (per_value + 1)


def _condconv_macs(m: CondConv2d, inputs: tuple, output: torch.Tensor) -> int:
    kernel = m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    mixing = output.shape[0] * m.num_experts * (kernel + (m.out_channels if m.bias is not None else 0))
    return output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] + mixing


def _condlinear_macs(m: CondLinear, inputs: tuple, output: torch.Tensor) -> int:
    rows = output.numel() // m.out_features
    kernel = m.out_features * m.in_features + (m.out_features if m.bias is not None else 0)
    return output.numel() * m.in_features + rows * m.num_experts * kernel


def _involution_macs(m: Involution2d, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * m.kernel_size**2


def _lambda_macs(m: LambdaLayer, inputs: tuple, output: torch.Tensor) -> int:
    x = _first(inputs)
    n, pixels = x.shape[0], x.shape[2] * x.shape[3]
    # content lambda (k^T v), then q applied to the content and to the positional lambdas
    return n * pixels * m.key_dim * m.value_dim * (1 + 2 * m.heads)


def _conv_macs(m: _ConvNd, inputs: tuple, output: torch.Tensor) -> int:
    kernel = math.prod(m.kernel_size)
    if isinstance(m, _ConvTransposeNd):
        return _first(inputs).numel() * (m.out_channels // m.groups) * kernel
    return output.numel() * (m.in_channels // m.groups) * kernel


def _linear_macs(m: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * m.in_features


_RULES: tuple[tuple[type, Callable[[Any, tuple, Any], int]], ...] = (
    (SwitchedConv2d, _switched_macs),
    (CondConv2d, _condconv_macs),
    (CondLinear, _condlinear_macs),
    (Involution2d, _involution_macs),
    (LambdaLayer, _lambda_macs),
    (_ConvNd, _conv_macs),
    (nn.Linear, _linear_macs),
)


def layer_macs(module: nn.Module) -> Callable[[tuple, Any], int] | None:
    """The rule counting ``module``'s own multiply-adds (children excluded), or None."""
    custom = getattr(module, "count_macs", None)
    if callable(custom):
        return custom
    for kind, rule in _RULES:
        if isinstance(module, kind):
            return lambda inputs, output, _m=module, _r=rule: _r(_m, inputs, output)
    return None


def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W) positive ints, got {tuple(input_shape)!r}")
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    # values in [0, 1]: what image models see; routing-independent counts don't care
    return torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device=ref.device, dtype=dtype)


def _output_pixels(output: Any, x: torch.Tensor) -> int:
    if isinstance(output, dict):
        for key in ("reconstruction", "sr", "image"):
            if isinstance(output.get(key), torch.Tensor):
                output = output[key]
                break
        else:
            output = next((v for v in output.values() if isinstance(v, torch.Tensor) and v.dim() == 4), None)
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, torch.Tensor) and output.dim() == 4:
        return output.shape[0] * output.shape[2] * output.shape[3]
    return x.shape[0] * x.shape[2] * x.shape[3]  # classifier: per input pixel


def _count(model: nn.Module, input_shape: Sequence[int]) -> tuple[dict[str, int], int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    x = _example(model, input_shape)
    macs: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        rule = layer_macs(module)
        if rule is None:
            continue

        def hook(_module: nn.Module, inputs: tuple, output: Any, _name: str = name, _rule=rule) -> None:
            macs[_name] = macs.get(_name, 0) + int(_rule(inputs, output))

        handles.append(module.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # no BN/SwitchNorm/codebook statistics change while counting
        with torch.no_grad():
            output = model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return macs, _output_pixels(output, x)


def flops_per_pixel(model: nn.Module, input_shape: Sequence[int]) -> float:
    """``2 * multiply-adds / output pixels`` for one forward of a ``[0, 1)`` input of
    ``input_shape`` ((C, H, W) or (N, C, H, W)); see the module docstring for what counts."""
    macs, pixels = _count(model, input_shape)
    return 2.0 * sum(macs.values()) / pixels


def model_summary(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """``dict(params, flops_per_pixel, by_layer)``; ``by_layer[name]`` is
    ``dict(type, params (own, children excluded), flops_per_pixel (own))`` for each counted layer."""
    macs, pixels = _count(model, input_shape)
    modules = dict(model.named_modules())
    by_layer = {
        name: {
            "type": type(modules[name]).__name__,
            "params": sum(p.numel() for p in modules[name].parameters(recurse=False)),
            "flops_per_pixel": 2.0 * count / pixels,
        }
        for name, count in macs.items()
    }
    return {
        "params": count_parameters(model),
        "flops_per_pixel": 2.0 * sum(macs.values()) / pixels,
        "by_layer": by_layer,
    }
