"""dynconv.convert: in-place, function-preserving, name/glob/predicate selection, skips listed."""

import pytest
import torch
from torch import nn

import dynconv
from dynconv import CondConv2d, SwitchedConv2d


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        Block(8),
        nn.Sequential(nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4, padding=1)),
        nn.Conv2d(16, 4, 1),
    ).eval()


@pytest.mark.parametrize("to,kwargs", [("switched", dict(breadth=4)), ("switched", dict(breadth=8, routing="soft", selector="lambda")), ("condconv", dict(num_experts=4))])
def test_conversion_preserves_function(to, kwargs):
    model = small_cnn()
    x = torch.randn(2, 3, 23, 21)
    before = model(x)
    if to == "switched":
        with pytest.warns(UserWarning, match=r"skipped: 3.2 \(groups=4"):
            names = dynconv.convert(model, to=to, **kwargs)
    else:
        names = dynconv.convert(model, to=to, **kwargs)
    after = model.eval()(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    cls = SwitchedConv2d if to == "switched" else CondConv2d
    assert all(isinstance(model.get_submodule(n), cls) for n in names)
    if to == "switched":
        assert names == ["0", "2.conv1", "2.conv2", "3.0", "4"]
        assert names.skipped == {"3.2": "groups=4 is not supported by SwitchedConv2d"}
    else:
        assert "3.2" in names and names.skipped == {}
    model.train()
    model(x).sum().backward()  # trains after conversion


def test_include_patterns_and_predicate():
    model = small_cnn()
    assert dynconv.convert(model, include="2.conv*", breadth=2) == ["2.conv1", "2.conv2"]
    model = small_cnn()
    assert dynconv.convert(model, include=["0", "4"], breadth=2) == ["0", "4"]
    model = small_cnn()
    names = dynconv.convert(model, include=lambda name, m: m.kernel_size == (5, 5), breadth=2)
    assert names == ["3.0"]


def test_skips_warn_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 3, groups=3))
    with pytest.warns(UserWarning, match="skipped: 0 .*padding_mode='reflect'.*1 .*groups=3"):
        names = dynconv.convert(model, breadth=2)
    assert names == [] and set(names.skipped) == {"0", "1"}
    with pytest.raises(ValueError, match="to must be one of"):
        dynconv.convert(model, to="moe")
    with pytest.raises(TypeError, match="include must be"):
        dynconv.convert(model, include=[1, 2])
