"""What the dynamic convs share (DynamicConv2d), and create_conv2d."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynconv
from dynconv import CondConv2d, Involution2d, SwitchedConv2d, create_conv2d
from dynconv.nn import LAYERS, DynamicConv2d


def test_positional_arguments_follow_nn_conv2d():
    torch_conv = nn.Conv2d(4, 6, 3, 2, 1, 1, 1, False)
    for cls in (SwitchedConv2d, CondConv2d):
        layer = cls(4, 6, 3, 2, 1, 1, 1, False)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            assert getattr(layer, name) == getattr(torch_conv, name), (cls, name)
        assert layer.bias is None
    assert CondConv2d(4, 6, 3, 1, 1, 1, 2).groups == 2


def test_groups_errors_name_the_value():
    with pytest.raises(ValueError, match="SwitchedConv2d supports groups=1 only, got groups=2"):
        SwitchedConv2d(4, 4, 3, 1, 1, 1, 2)
    with pytest.raises(TypeError, match="groups must be an int, got False: the argument after dilation is groups"):
        SwitchedConv2d(4, 4, 3, 1, 1, 1, False)  # bias passed where nn.Conv2d has groups
    with pytest.raises(ValueError, match=r"in_channels \(4\) and out_channels \(6\) must be divisible by groups \(4\)"):
        CondConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match=r"channels \(30\) must be divisible by groups \(4\)"):
        Involution2d(30, 3, groups=4)


@pytest.mark.parametrize(
    "layer",
    [
        SwitchedConv2d(3, 5, 3, stride=2, padding=0, dilation=2, breadth=2),
        CondConv2d(4, 4, (3, 5), stride=(1, 2), padding=(1, 0), num_experts=2),
        Involution2d(16, 3, stride=2, groups=2),
    ],
    ids=["switched", "condconv", "involution"],
)
def test_output_size_is_what_forward_returns(layer):
    assert isinstance(layer, DynamicConv2d)
    x = torch.randn(2, layer.in_channels, 11, 9)
    assert layer(x).shape == (2, layer.out_channels, *layer.output_size(11, 9))


def test_repr_prints_non_defaults_like_nn_conv2d():
    assert SwitchedConv2d(4, 8, 3, padding=1).extra_repr() == "4, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)"
    assert (
        SwitchedConv2d(4, 8, 3, bias=False, breadth=4, routing="soft", selector_channels=3, backend="gather").extra_repr()
        == "4, 8, kernel_size=(3, 3), stride=(1, 1), bias=False, breadth=4, selector_channels=3, routing='soft', "
        "backend='gather'"
    )
    assert (
        CondConv2d(4, 8, 3, groups=2, temperature=30).extra_repr()
        == "4, 8, kernel_size=(3, 3), stride=(1, 1), groups=2, temperature=30.0"
    )
    assert Involution2d(32, 3).extra_repr() == "32, kernel_size=3, stride=1, groups=2"


def test_autocast_runs_the_op_in_the_autocast_dtype():
    layer = CondConv2d(4, 4, 3, padding=1, num_experts=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 4, 6, 6)).dtype == torch.bfloat16
    assert layer(torch.randn(1, 4, 6, 6)).dtype == torch.float32


def test_create_conv2d_builds_every_kind():
    expected = {"conv": nn.Conv2d, "switched": SwitchedConv2d, "condconv": CondConv2d, "involution": Involution2d}
    assert set(LAYERS.names()) == set(expected)
    for kind, cls in expected.items():
        padding = {} if kind == "involution" else {"padding": 1}  # involution pads 'same' itself
        layer = create_conv2d(kind, 8, 8, 3, stride=2, **padding)
        assert type(layer) is cls and layer(torch.randn(1, 8, 9, 9)).shape[-1] == 5
    assert create_conv2d("switched", 4, 6, 3, padding=1, breadth=3).weight.shape == (3, 6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"layer kind must be one of .*got unknown layer kind 'dense'"):
        create_conv2d("dense", 4, 4, 3)
    with pytest.raises(ValueError, match=r"'switched' got unknown option\(s\) \['num_experts'\]; accepted options: .*'breadth'"):
        create_conv2d("switched", 4, 4, 3, num_experts=2)
    with pytest.raises(ValueError, match="involution keeps the channel count"):
        create_conv2d("involution", 4, 8, 3)
    assert dynconv.create_conv2d is create_conv2d

