"""The Registry class behind models, datasets, losses and layer kinds."""

from __future__ import annotations

import inspect

import pytest

from dynconv.data import DATASETS
from dynconv.losses import LOSSES
from dynconv.models import MODELS
from dynconv.nn import LAYERS
from dynconv.registry import Registry, UnknownNameError


def _make() -> Registry:
    reg = Registry("widget", positional=("size",), meta={"colour": ("red", "blue")})

    @reg.register("plain", colour="red")
    def plain(size: int, *, weight: float = 1.0, name: str) -> tuple:
        return size, weight, name

    reg.register("open", lambda size, **kw: (size, kw), colour="blue")
    return reg


def test_lookup_options_meta_and_build():
    reg = _make()
    assert reg.names() == ("plain", "open") and list(reg) == ["plain", "open"] and len(reg) == 2
    assert "plain" in reg and "nope" not in reg and ["unhashable"] not in reg
    assert reg.meta("open") == {"colour": "blue"}
    options = reg.options("plain")
    assert options.names == ("weight", "name") and not options.var_keyword  # 'size' is positional
    assert options.required == ("name",) and options.defaults["weight"] == 1.0
    assert options.defaults["name"] is inspect.Parameter.empty
    assert reg.options("open").var_keyword and reg.options("open").unknown(["anything"]) == []
    assert reg.build("plain", 3, name="a") == (3, 1.0, "a")
    assert reg.build("open", 3, x=1) == (3, {"x": 1})
    assert reg["plain"] is reg.get("plain")


def test_errors_name_the_registry_the_name_and_the_known_ones():
    reg = _make()
    with pytest.raises(UnknownNameError, match=r"widget must be one of \['open', 'plain'\], got unknown widget 'nope'") as info:
        reg.get("nope")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("widget must be")  # not quoted like a plain KeyError
    with pytest.raises(KeyError):
        reg["nope"]
    with pytest.raises(ValueError, match=r"widget 'plain' got unknown option\(s\) \['wieght'\]; accepted options: \['name', 'weight'\]"):
        reg.build("plain", 1, name="a", wieght=2)
    with pytest.raises(ValueError, match="colour must be one of \\('red', 'blue'\\), got 'green'"):
        reg.register("x", colour="green")
    with pytest.raises(TypeError, match="metadata must be \\['colour'\\]"):
        reg.register("x", lambda size: size)
    with pytest.raises(ValueError, match="widget 'plain' is already registered"):
        reg.register("plain", lambda size: size, colour="red")
    reg.register("plain", reg.get("plain"), colour="red")  # the same builder again: a no-op


def test_the_package_registries():
    assert {"resnet18_cifar", "sr_switched", "vqvae"} <= set(MODELS.names())
    assert MODELS.meta("vqvae")["task"] == "reconstruction"
    assert "split" not in DATASETS.options("cifar10").names  # passed positionally
    assert LOSSES.options("cross_entropy").names == ("label_smoothing", "weight")
    assert LAYERS.names() == ("conv", "switched", "condconv", "involution")
