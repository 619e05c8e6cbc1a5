"""CondConv2d / CondLinear / Involution2d layers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv import CondConv2d, CondLinear, Involution2d


@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_cond_conv_per_example_math(routing, groups, f64):
    layer = CondConv2d(4, 8, 3, stride=2, padding=1, groups=groups, num_experts=3, routing=routing, temperature=2.0)
    x = torch.randn(3, 4, 7, 7)
    y = layer(x)
    logits = x.mean((2, 3)) @ layer.route.router.weight.T + layer.route.router.bias
    a = torch.sigmoid(logits) if routing == "sigmoid" else torch.softmax(logits / 2.0, 1)
    for n in range(3):
        kernel = (a[n].view(3, 1, 1, 1, 1) * layer.weight).sum(0)
        bias = a[n] @ layer.bias
        torch.testing.assert_close(y[n : n + 1], F.conv2d(x[n : n + 1], kernel, bias, 2, 1, 1, groups))


def test_cond_conv_gradcheck_all_parameters(f64):
    layer = CondConv2d(4, 4, 3, padding=1, groups=4, num_experts=2, routing="softmax")  # depthwise
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    params = dict(layer.named_parameters())

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(params, tensors)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params.values()]))


def test_cond_linear_gradcheck_and_from_linear(f64):
    layer = CondLinear(5, 3, num_experts=4)
    x = torch.randn(6, 5, requires_grad=True)
    params = dict(layer.named_parameters())

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(params, tensors)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params.values()]))
    linear = nn.Linear(5, 3)
    converted = CondLinear.from_linear(linear, num_experts=4)
    torch.testing.assert_close(converted(x), linear(x))
    assert converted(torch.randn(2, 7, 5)).shape == (2, 7, 3)


@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
def test_cond_conv_from_conv_preserves_and_experts_differ(routing):
    conv = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3)
    layer = CondConv2d.from_conv(conv, num_experts=4, routing=routing)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(layer.weight[0], layer.weight[1])
    layer(x).square().sum().backward()
    assert layer.route.router.weight.grad.abs().sum() > 0  # the router can learn from the start


def test_temperature_is_settable():
    layer = CondConv2d(3, 3, 1, routing="softmax", temperature=30.0)
    layer.temperature = 1.0
    assert layer.route.temperature == 1.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        layer.temperature = 0


def test_cond_conv_errors():
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="routing must be one of"):
        CondConv2d(4, 4, 3, routing="relu")
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        CondConv2d(4, 4, 3, num_experts=0)
    with pytest.raises(ValueError, match=r"x must have 4 channels"):
        CondConv2d(4, 4, 3)(torch.randn(1, 3, 5, 5))


def naive_involution_layer(layer, x):
    kernel = layer.kernel(x)  # (N, G, K*K, H, W)
    k, p, s = layer.kernel_size, layer.padding, layer.stride
    patches = F.unfold(x, k, layer.dilation, p, s)
    n, c = x.shape[:2]
    patches = patches.view(n, layer.groups, c // layer.groups, k * k, *kernel.shape[-2:])
    return (patches * kernel.unsqueeze(2)).sum(3).view(n, c, *kernel.shape[-2:])


@pytest.mark.parametrize("stride,size", [(1, 8), (2, 9), (2, 8)])
def test_involution_layer(stride, size, f64):
    layer = Involution2d(8, kernel_size=3, stride=stride, groups=2, reduction=2).eval()
    x = torch.randn(2, 8, size, size)
    y = layer(x)
    out = (size - 1) // stride + 1
    assert y.shape == (2, 8, out, out)
    torch.testing.assert_close(y, naive_involution_layer(layer, x))
    assert Involution2d(32).groups == 2 and Involution2d(8).groups == 1


def test_involution_gradcheck_all_parameters(f64):
    layer = Involution2d(4, kernel_size=3, stride=2, groups=2, reduction=2).eval()
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    params = dict(layer.named_parameters())

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(params, tensors)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params.values()]))


def test_involution_errors_autocast_channels_last_copy():
    with pytest.raises(ValueError, match="divisible by groups"):
        Involution2d(6, groups=4)
    layer = Involution2d(16, kernel_size=3, groups=4)
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    layer.eval()
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))
    with pytest.raises(ValueError, match="x must have 16 channels"):
        layer(torch.randn(1, 8, 6, 6))


def test_experts_initialised_like_dense_layers():
    torch.manual_seed(0)
    conv = CondConv2d(8, 16, 3, groups=2, num_experts=3)
    bound = 1 / (4 * 9) ** 0.5  # fan-in of one expert: in/groups * kH * kW
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert conv.weight.abs().max() > 0.9 * bound and not torch.equal(conv.weight[0], conv.weight[1])
    linear = CondLinear(25, 4, num_experts=3)
    assert linear.weight.abs().max() <= 0.2 and linear.bias.abs().max() <= 0.2
