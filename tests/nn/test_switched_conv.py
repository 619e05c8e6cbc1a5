"""SwitchedConv2d: routing math, the hard-routing gradient rule, conversion, selectors, state."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv import SwitchedConv2d
from dynconv.nn import hard_index_gate, hard_routing
from dynconv.ops.switched import all_experts


def test_hard_routing_rule():
    p = torch.rand(2, 4, 3, 3, dtype=torch.float64).softmax(1).requires_grad_()
    out = hard_routing(p)
    index = p.argmax(1)
    torch.testing.assert_close(out, F.one_hot(index, 4).permute(0, 3, 1, 2).double())
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, p, g)
    chosen = F.one_hot(index, 4).permute(0, 3, 1, 2).bool()
    torch.testing.assert_close(grad, torch.where(chosen, g / p.detach(), torch.zeros_like(g)))
    # the (index, gate) form follows the same rule
    idx, gate = hard_index_gate(p)
    assert torch.equal(idx, index) and torch.equal(gate, torch.ones_like(gate))
    gg = torch.randn_like(gate)
    (grad2,) = torch.autograd.grad(gate, p, gg)
    torch.testing.assert_close(grad2, torch.where(chosen, (gg / p.detach().gather(1, index[:, None])[:, 0]).unsqueeze(1), torch.zeros_like(p)))


@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_layer_matches_per_pixel_mixture(routing, f64):
    layer = SwitchedConv2d(3, 4, 3, padding=1, stride=2, breadth=5, routing=routing, switch_norm=False)
    x = torch.randn(2, 3, 7, 7)
    y = layer(x)
    probs = layer.routing_probabilities(x)
    experts = all_experts(x, layer.weight, layer.bias, 2, 1, 1)  # (N, b, out, H, W)
    if routing == "soft":
        expected = (probs.unsqueeze(2) * experts).sum(1)
    else:
        index = probs.argmax(1)
        expected = experts.gather(1, index[:, None, None].expand(-1, 1, 4, -1, -1))[:, 0]
    torch.testing.assert_close(y, expected)


def test_gradcheck_soft_layer_all_parameters(f64):
    layer = SwitchedConv2d(2, 3, 3, padding=1, breadth=3, routing="soft", switch_norm=False)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    params = dict(layer.named_parameters())
    names = list(params)

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params.values()]))


def test_gradcheck_hard_layer_conv_parameters(f64):
    """With the routing fixed (a separate selector input), the output is smooth in x, weight, bias."""
    layer = SwitchedConv2d(2, 3, 3, padding=1, breadth=3, routing="hard").eval()
    guide = torch.randn(1, 2, 5, 5)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,), {"selector_input": guide})

    assert torch.autograd.gradcheck(f, (x, layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()))


def test_hard_layer_selector_gradient_follows_rule(f64):
    """Selector grads equal those of y = (p / p0)[chosen] * conv_chosen with p0 the forward's
    probabilities held constant: exactly 'grad at the chosen expert / p'."""
    torch.manual_seed(0)
    layer = SwitchedConv2d(2, 3, 3, padding=1, breadth=4, routing="hard", switch_norm=False)
    x = torch.randn(2, 2, 5, 5)
    g = torch.randn(2, 3, 5, 5)
    layer(x).backward(g)
    got = [p.grad.clone() for p in layer.selector.parameters()]
    for p in layer.selector.parameters():
        p.grad = None
    probs = layer.routing_probabilities(x)
    index = probs.argmax(1, keepdim=True)
    p_chosen = probs.gather(1, index)
    gate = (p_chosen / p_chosen.detach())[:, 0]
    experts = all_experts(x, layer.weight, layer.bias, 1, 1, 1)
    chosen = experts.gather(1, index[:, :, None].expand(-1, 1, 3, -1, -1))[:, 0]
    (chosen * gate[:, None]).backward(g)
    for a, p in zip(got, layer.selector.parameters()):
        torch.testing.assert_close(a, p.grad)
        assert a.abs().sum() > 0


def test_selector_gradient_flows_through_switch_norm():
    layer = SwitchedConv2d(3, 4, 3, padding=1, breadth=4, norm_buffer=2)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        layer(x)
    assert bool(layer.norm.filled)
    layer(x).square().mean().backward()
    assert layer.selector.weight.grad.abs().sum() > 0


def test_breadth_one_is_exactly_conv2d():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    layer = SwitchedConv2d.from_conv(conv, breadth=1)
    assert layer.selector is None and layer.norm is None
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(layer(x), conv(x))
    fresh = SwitchedConv2d(3, 5, 3, breadth=1)
    assert fresh.weight.shape == (1, 5, 3, 3, 3)


@pytest.mark.parametrize("routing", ["hard", "soft"])
@pytest.mark.parametrize("selector", ["conv1x1", "lambda", "lambda_then_conv1x1"])
def test_from_conv_preserves_output(routing, selector):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=0, dilation=1)
    x = torch.randn(2, 4, 11, 10)
    layer = SwitchedConv2d.from_conv(conv, breadth=8, routing=routing, selector=selector)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight[3], conv.weight)


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_detached_selector_input_keeps_the_networks_gradients_at_conversion(routing):
    """Right after a conversion the output is unchanged; with ``detach_selector_input`` so are
    the gradients of every parameter before the layer (the routing gradient trains only the
    selector). With the original rule (hard routing) the ``grad / p`` gate gradient also flows
    through the selector into the layer's input, so earlier layers get other gradients."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).double()
    x, target = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def grads(model):
        model.zero_grad()
        F.mse_loss(model(x), target).backward()
        return model[0].weight.grad.clone(), model[2].weight.grad

    reference, last = grads(plain)
    for detach in (True, False):
        converted = copy.deepcopy(plain)
        converted[2] = SwitchedConv2d.from_conv(plain[2], breadth=4, routing=routing, detach_selector_input=detach)
        first, experts = grads(converted)
        torch.testing.assert_close(experts.sum(0), last)  # the experts share the conv's gradient
        assert converted[2].selector.weight.grad.abs().sum() > 0  # the selector (a 1x1 conv) still learns
        if detach:
            torch.testing.assert_close(first, reference)
        elif routing == "hard":
            assert not torch.allclose(first, reference, rtol=1e-3, atol=0)
    assert "detach_selector_input=True" in repr(SwitchedConv2d(2, 2, 3, breadth=2, detach_selector_input=True))
    with pytest.raises(TypeError, match="detach_selector_input must be a bool, got 'yes'"):
        SwitchedConv2d(2, 2, 3, breadth=2, detach_selector_input="yes")


def test_default_init_like_conv2d():
    torch.manual_seed(0)
    layer = SwitchedConv2d(64, 64, 3, breadth=4)
    bound = 1 / (64 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for e in range(4):
        assert layer.weight[e].abs().max() <= bound
        assert layer.weight[e].abs().max() > 0.9 * bound
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_selector_input_and_custom_selector():
    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)

        def forward(self, g):
            return self.conv(g)

    layer = SwitchedConv2d(4, 2, 3, padding=1, breadth=3, selector=Guide())
    x, guide = torch.randn(2, 4, 6, 6), torch.randn(2, 1, 6, 6)
    assert layer(x, selector_input=guide).shape == (2, 2, 6, 6)
    with pytest.raises(ValueError, match="selector_input must have the batch size and spatial size"):
        layer(x, selector_input=torch.randn(2, 1, 5, 6))
    bad = SwitchedConv2d(4, 2, 3, padding=1, breadth=3, selector=nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"selector output must have shape .*\(2, 3, 6, 6\), got \(2, 2, 6, 6\)"):
        bad(x)
    channels = SwitchedConv2d(4, 2, 3, padding=1, breadth=3, selector_channels=1)
    assert channels(x, selector_input=guide).shape == (2, 2, 6, 6)
    with pytest.raises(ValueError, match="selector_input must have 1 channels"):
        channels(x, selector_input=x)


def test_selector_dropout_keeps_one_expert():
    layer = SwitchedConv2d(3, 3, 1, breadth=4, selector_dropout=0.99, switch_norm=False).train()
    x = torch.randn(8, 3, 4, 4)
    torch.manual_seed(0)
    out = layer(x)
    assert torch.isfinite(out).all()
    probs = layer.routing_probabilities(x)
    assert torch.isfinite(probs).all() and ((probs > 0).flatten(2).any(2).sum(1) >= 1).all()
    layer.eval()  # no dropout in eval
    torch.testing.assert_close(layer.routing_probabilities(x), layer.routing_probabilities(x))


def test_selector_dropout_masks_dropped_experts_in_training_only():
    """A dropped expert gets probability 0 for every pixel of that example (it leaves the
    softmax; a zeroed logit would still win where the others are negative), the kept ones
    share the mass as the softmax over them, gradients stay finite, and eval drops nothing."""
    torch.manual_seed(0)
    layer = SwitchedConv2d(4, 4, 3, padding=1, breadth=6, selector_dropout=0.5, switch_norm=False, routing="soft")
    with torch.no_grad():
        layer.selector.bias.fill_(-5.0)  # all logits negative: a zeroed logit would dominate
    x = torch.randn(16, 4, 5, 5)
    layer.train()
    probs = layer.routing_probabilities(x)
    dropped = (probs == 0).flatten(2).all(2)  # (N, breadth): that expert has 0 on every pixel
    assert dropped.any() and not dropped.all(1).any()
    assert ((probs == 0).flatten(2).any(2) == dropped).all()  # whole experts per example, not pixels
    logits = layer.selector(x)
    expected = logits.masked_fill(dropped[:, :, None, None], float("-inf")).softmax(1)
    torch.testing.assert_close(probs, expected)
    out = layer(x)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    layer.eval()
    assert (layer.routing_probabilities(x) > 0).all()
    torch.testing.assert_close(layer.routing_probabilities(x), layer.selector(x).softmax(1))
    with pytest.raises(ValueError, match=r"selector_dropout must be in \[0, 1\), got 1.0"):
        SwitchedConv2d(4, 4, 3, selector_dropout=1.0)


def test_lambda_then_conv1x1_selector():
    """Exactly a lambda layer then a 1x1 conv (stride on the conv): logits of the output grid,
    gradients reach both parts, and the name works from a layer, convert and a config."""
    from dynconv.config import config_from_dict
    from dynconv.nn.selectors import SELECTORS, LambdaLayer, LambdaThenConv1x1Selector

    assert {"conv1x1", "lambda", "lambda_then_conv1x1"} <= set(SELECTORS.names())
    selector = SELECTORS.build("lambda_then_conv1x1", 8, 5, (2, 2))
    assert isinstance(selector, LambdaThenConv1x1Selector)
    assert [type(m) for m in selector] == [LambdaLayer, nn.Conv2d]
    assert selector[1].kernel_size == (1, 1) and selector[1].stride == (2, 2) and selector[1].out_channels == 5
    layer = SwitchedConv2d(8, 6, 4, stride=2, padding=1, breadth=5, selector="lambda_then_conv1x1")
    x = torch.randn(2, 8, 10, 12, requires_grad=True)
    assert layer.routing_probabilities(x).shape == (2, 5, 5, 6)
    layer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for part in (layer.selector[0].to_q, layer.selector[0].position, layer.selector[1]):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"channels \(6\) must be divisible by heads \(4\)"):
        SwitchedConv2d(6, 6, 3, breadth=2, selector="lambda_then_conv1x1")
    # convert and a config's convert section name it; the config survives a round trip
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    assert dynconv.convert(model, include="2", breadth=3, selector="lambda_then_conv1x1") == ["2"]
    assert isinstance(model[2].selector, LambdaThenConv1x1Selector)
    raw = {"model": {"name": "sr_plain"}, "data": {"name": "skimage_sr"}, "train": {"steps": 2},
           "losses": [{"name": "l1"}], "convert": {"step": 1, "selector": "lambda_then_conv1x1"}}
    config = config_from_dict(raw)
    again = config_from_dict(config.to_dict())
    assert again.convert.selector == "lambda_then_conv1x1" and again.to_dict() == config.to_dict()
    assert again.convert.layer_kwargs()["selector"] == "lambda_then_conv1x1"


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(breadth=0), ValueError, "breadth must be >= 1, got 0"),
        (dict(kernel_size=-1), ValueError, "kernel_size must be >= 1"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(selector="mlp"), ValueError, "selector must be one of"),
        (dict(routing="argmax"), ValueError, "routing must be one of \\('hard', 'soft'\\), got 'argmax'"),
        (dict(selector=3), TypeError, "selector must be one of"),
        (dict(breadth=2.0), TypeError, "breadth must be an int"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    args = dict(in_channels=3, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        SwitchedConv2d(**args)


def test_forward_errors():
    layer = SwitchedConv2d(3, 4, 3, breadth=2)
    with pytest.raises(ValueError, match=r"x must have 3 channels .* got 5"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="x must be 4-D"):
        layer(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="floating dtype"):
        layer(torch.zeros(1, 3, 8, 8, dtype=torch.long))


def test_autocast_channels_last_deepcopy_state_dict():
    layer = SwitchedConv2d(4, 4, 3, padding=1, breadth=4)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    layer.eval()
    ref = layer(x)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), ref)
    fresh = SwitchedConv2d(4, 4, 3, padding=1, breadth=4).eval()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), ref)
    assert "norm.usage" in layer.state_dict()


def test_routing_stats_and_selector_maps():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3, stride=2)))
    dynconv.convert(net, "switched", breadth=4)
    x = torch.randn(2, 3, 9, 9)
    net.train()
    for _ in range(3):
        net(x)
    stats = dynconv.routing_stats(net)
    assert set(stats) == {"0", "2.0"}
    for s in stats.values():
        assert s["steps"] == 3 and abs(float(s["usage"].sum()) - 1) < 1e-5 and 0 <= s["entropy"] <= 1
    maps = dynconv.selector_maps(net, x)
    assert maps["0"].shape == (2, 9, 9) and maps["2.0"].shape == (2, 4, 4)
    assert maps["0"].dtype == torch.long and int(maps["0"].max()) < 4
    assert net.training  # mode restored
    assert dynconv.routing_stats(net)["0"]["steps"] == 3  # eval pass not counted
