"""Reference ops: float64 gradcheck, and equality with independent per-pixel / per-example loops."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dynconv import ops



@pytest.fixture(autouse=True)
def float64_default(f64):
    """Every test here runs in float64 (see the ``f64`` fixture in conftest.py)."""


def naive_switched(x, weight, bias, routing, stride, padding, dilation):
    """Per-pixel loop: y[n, :, i, j] = sum_e s_e (W_e . patch + b)."""
    b, c_out, c_in, kh, kw = weight.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    n, _, h, w = x.shape
    h_out = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    y = torch.zeros(n, c_out, h_out, w_out)
    for ni, i, j in itertools.product(range(n), range(h_out), range(w_out)):
        patch = xp[ni, :, i * stride : i * stride + dilation * (kh - 1) + 1 : dilation,
                   j * stride : j * stride + dilation * (kw - 1) + 1 : dilation]
        if isinstance(routing, tuple):
            index, gate = routing
            e = int(index[ni, i, j])
            mix = [(e, gate[ni, i, j])]
        else:
            mix = [(e, routing[ni, e, i, j]) for e in range(b)]
        for e, s in mix:
            y[ni, :, i, j] += s * ((weight[e] * patch).sum(dim=(1, 2, 3)) + (bias if bias is not None else 0))
    return y


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2), (2, 1, 2)])
@pytest.mark.parametrize("hard", [False, True])
def test_switched_matches_per_pixel_loop(stride, padding, dilation, hard):
    x = torch.randn(2, 3, 7, 6)
    weight, bias = torch.randn(4, 5, 3, 3, 3), torch.randn(5)
    h_out = (7 + 2 * padding - 2 * dilation - 1) // stride + 1
    w_out = (6 + 2 * padding - 2 * dilation - 1) // stride + 1
    if hard:
        routing = (torch.randint(0, 4, (2, h_out, w_out)), torch.rand(2, h_out, w_out))
    else:
        routing = torch.rand(2, 4, h_out, w_out).softmax(1)
    y = ops.switched_conv2d(x, weight, bias, routing, stride, padding, dilation, backend="reference")
    torch.testing.assert_close(y, naive_switched(x, weight, bias, routing, stride, padding, dilation))


def test_switched_one_hot_equals_index_form():
    x, weight, bias = torch.randn(2, 3, 6, 6), torch.randn(3, 4, 3, 3, 3), torch.randn(4)
    index = torch.randint(0, 3, (2, 6, 6))
    one_hot = F.one_hot(index, 3).permute(0, 3, 1, 2).double()
    a = ops.switched_conv2d(x, weight, bias, one_hot, padding=1)
    b = ops.switched_conv2d(x, weight, bias, (index, torch.ones(2, 6, 6)), padding=1, backend="reference")
    torch.testing.assert_close(a, b)


def test_switched_gradcheck_soft_and_hard():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    weight = torch.randn(3, 2, 2, 3, 3, requires_grad=True)
    bias = torch.randn(2, requires_grad=True)
    soft = torch.rand(1, 3, 3, 3).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: ops.switched_conv2d(x, w, b, s, 2, 1, 1, backend="reference"), (x, weight, bias, soft)
    )
    index = torch.randint(0, 3, (1, 5, 5))
    gate = torch.rand(1, 5, 5, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, g: ops.switched_conv2d(x, w, b, (index, g), 1, 1, 1, backend="reference"), (x, weight, bias, gate)
    )


def naive_cond(x, weight, bias, a, stride, padding, dilation, groups):
    outs = []
    for n in range(x.shape[0]):
        kernel = sum(a[n, i] * weight[i] for i in range(weight.shape[0]))
        b = sum(a[n, i] * bias[i] for i in range(weight.shape[0])) if bias is not None else None
        outs.append(F.conv2d(x[n : n + 1], kernel, b, stride, padding, dilation, groups))
    return torch.cat(outs)


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (4, 1, 2, 2)])
def test_cond_conv_matches_per_example_loop(groups, stride, padding, dilation):
    x = torch.randn(3, 4, 7, 7)
    weight, bias = torch.randn(5, 8, 4 // groups, 3, 3), torch.randn(5, 8)
    a = torch.rand(3, 5)
    y = ops.cond_conv2d(x, weight, bias, a, stride, padding, dilation, groups, backend="reference")
    torch.testing.assert_close(y, naive_cond(x, weight, bias, a, stride, padding, dilation, groups))


def test_cond_gradcheck():
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    weight = torch.randn(3, 4, 2, 3, 3, requires_grad=True)
    bias = torch.randn(3, 4, requires_grad=True)
    a = torch.rand(2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ops.cond_conv2d(*t, stride=1, padding=1, dilation=1, groups=2, backend="reference"), (x, weight, bias, a)
    )
    xl = torch.randn(3, 4, requires_grad=True)
    wl, bl = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    al = torch.rand(3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(ops.cond_linear, (xl, wl, bl, al))
    torch.testing.assert_close(
        ops.cond_linear(xl, wl, bl, al),
        torch.stack([(al[n, 0] * wl[0] + al[n, 1] * wl[1]) @ xl[n] + al[n] @ bl for n in range(3)]),
    )


def naive_involution(x, kernel, k, stride, padding, dilation, groups):
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    _, _, _, h_out, w_out = kernel.shape
    y = torch.zeros(n, c, h_out, w_out)
    per = c // groups
    for ni, ch, i, j in itertools.product(range(n), range(c), range(h_out), range(w_out)):
        g = ch // per
        for a, b in itertools.product(range(k), range(k)):
            y[ni, ch, i, j] += kernel[ni, g, a * k + b, i, j] * xp[ni, ch, i * stride + a * dilation, j * stride + b * dilation]
    return y


@pytest.mark.parametrize("k,stride,padding,dilation,groups", [(3, 1, 1, 1, 2), (3, 2, 1, 1, 1), (5, 1, 4, 2, 4)])
def test_involution_matches_per_pixel_loop(k, stride, padding, dilation, groups):
    x = torch.randn(2, 4, 6, 7)
    h_out = (6 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (7 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    kernel = torch.randn(2, groups, k * k, h_out, w_out)
    y = ops.involution2d(x, kernel, k, stride, padding, dilation, groups, backend="reference")
    torch.testing.assert_close(y, naive_involution(x, kernel, k, stride, padding, dilation, groups))


def test_involution_gradcheck():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    kernel = torch.randn(1, 2, 9, 3, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, k: ops.involution2d(x, k, 3, 2, 1, 1, 2, backend="reference"), (x, kernel)
    )


def test_op_errors_name_the_argument():
    x, weight = torch.randn(1, 3, 5, 5), torch.randn(2, 4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"x must have 3 channels .* got 2"):
        ops.switched_conv2d(torch.randn(1, 2, 5, 5), weight, None, torch.rand(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"routing weights must have shape .*\(1, 2, 3, 3\)"):
        ops.switched_conv2d(x, weight, None, torch.rand(1, 3, 3, 3))
    with pytest.raises(TypeError, match="routing index must be int64"):
        ops.switched_conv2d(x, weight, None, (torch.zeros(1, 3, 3, dtype=torch.int32), torch.ones(1, 3, 3)))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.switched_conv2d(x, weight, None, torch.rand(1, 2, 3, 3), backend="cuda")
    with pytest.raises(TypeError, match="floating dtype"):
        ops.switched_conv2d(x.long(), weight, None, torch.rand(1, 2, 3, 3))
    with pytest.raises(ValueError, match="routing_weights must have shape"):
        ops.cond_conv2d(x, torch.randn(2, 4, 3, 3, 3), None, torch.rand(1, 3))
    with pytest.raises(ValueError, match="kernel must have shape"):
        ops.involution2d(x, torch.randn(1, 1, 9, 4, 4), 3, padding=1)
