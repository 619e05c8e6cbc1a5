"""Model surgery: turn a trained model's ``nn.Conv2d`` layers into dynamic ones, in place,
without changing the model's function (the first step of staged training)."""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ._checks import choice
from .nn.base import conv_padding
from .nn.create import LAYERS

Include = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]
#: the layer kinds a conv converts to: those whose class has ``from_conv``
TARGETS = tuple(kind for kind in LAYERS.names() if hasattr(LAYERS.get(kind), "from_conv"))


def _target(to: str) -> type:
    """The layer class of the conversion ``to`` (``'switched'`` -> SwitchedConv2d, ...)."""
    return LAYERS.get(choice(to, "to", TARGETS))


class ConvertedNames(list):
    """The converted module names (a ``list[str]``); ``skipped`` maps each matching conv
    that was left alone to the reason."""

    def __init__(self, names: Iterable[str] = (), skipped: dict[str, str] | None = None) -> None:
        super().__init__(names)
        self.skipped: dict[str, str] = dict(skipped or {})


def include_matcher(include: Include) -> Callable[[str, nn.Module], bool]:
    """The predicate ``convert`` applies to (module name, module) for ``include``: exact names or
    fnmatch globs (``'body.*.conv'``), a predicate, or None for every conv."""
    if include is None:
        return lambda name, module: True
    if callable(include):
        return include  # type: ignore[return-value]
    patterns = [include] if isinstance(include, str) else list(include)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"include must be None, a name/glob pattern, a list of them or a predicate, got {include!r}")
    return lambda name, module: any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _skip_reason(conv: nn.Conv2d, target: type) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported"
    if not target.supports_groups and conv.groups != 1:
        return f"groups={conv.groups} is not supported by {target.__name__}"
    try:
        conv_padding(conv)
    except ValueError as error:  # e.g. padding='same' with an even receptive field
        return str(error)
    return None


def convert(model: nn.Module, to: str = "switched", include: Include = None, **layer_kwargs) -> ConvertedNames:
    """Replace matching ``nn.Conv2d`` modules of ``model`` in place (any nesting).

    ``to``: ``'switched'`` (:meth:`SwitchedConv2d.from_conv`, kwargs such as ``breadth``,
    ``selector``, ``routing``) or ``'condconv'`` (:meth:`CondConv2d.from_conv`, kwargs such as
    ``num_experts``, ``routing``). ``include``: ``None`` (every conv), a module name or glob
    pattern (``'layer*.conv2'``), a list of them, or a predicate ``(name, module) -> bool``.
    Returns the converted names; convs that match but cannot be converted are listed in the
    result's ``skipped`` and in a warning. The converted model computes the same function.
    """
    target = _target(to)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    matches = include_matcher(include)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d and name and matches(name, module)
    ]
    if isinstance(model, nn.Conv2d):
        raise ValueError("model is itself an nn.Conv2d; use SwitchedConv2d.from_conv / CondConv2d.from_conv")
    result = ConvertedNames()
    for name, conv in targets:
        reason = _skip_reason(conv, target)
        if reason is not None:
            result.skipped[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, target.from_conv(conv, **layer_kwargs))
        result.append(name)
    if result.skipped:
        listed = ", ".join(f"{n} ({r})" for n, r in result.skipped.items())
        warnings.warn(f"convert(to={to!r}) skipped: {listed}", UserWarning, stacklevel=2)
    return result


class LayerOptionError(ValueError):
    """A conversion's layer option is unknown or has a bad value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# the arguments from_conv takes from the conv itself, not from the caller
_FROM_CONV = {"self", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "bias", "device", "dtype"}


def layer_options(to: str) -> list[str]:
    """The keyword options a conversion ``to`` accepts (``convert(..., **options)``)."""
    cls = _target(to)
    names = [*inspect.signature(cls.from_conv).parameters, *inspect.signature(cls.__init__).parameters]
    return [n for n in dict.fromkeys(names) if n not in _FROM_CONV and n not in ("cls", "conv", "kwargs")]


def check_layer_kwargs(to: str, layer_kwargs: dict) -> None:
    """Check conversion options before any model is touched: build one converted layer from
    a small conv on the meta device. Raises :class:`LayerOptionError` naming the option,
    the value and what is accepted."""
    accepted = layer_options(to)
    for key in layer_kwargs:
        if key not in accepted:
            raise LayerOptionError(key, f"unknown {to} layer option {key!r}; accepted: {accepted}")
    target = _target(to)
    try:
        with torch.device("meta"):
            target.from_conv(nn.Conv2d(8, 8, 3, padding=1), **layer_kwargs)
    except (ValueError, TypeError) as error:
        named = [k for k in layer_kwargs if re.search(rf"\b{re.escape(k)}\b", str(error))]
        key = named[0] if named else next(iter(layer_kwargs), "")
        raise LayerOptionError(key, str(error)) from None
    except (RuntimeError, NotImplementedError):  # not buildable on the meta device: checked when converting
        pass
