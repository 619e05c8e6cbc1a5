"""SwitchNorm: fill, rotate, persist, frozen in eval, NaN steps skipped, missing-buffer warning."""

import warnings

import pytest
import torch

from dynconv import SwitchNorm


def probs(n=2, b=3, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, b, h, w, generator=g).softmax(1)


def test_identity_until_filled_then_normalises_by_mean_usage():
    norm = SwitchNorm(3, buffer_size=4).train()
    steps = [probs(seed=s) for s in range(4)]
    for p in steps[:3]:
        torch.testing.assert_close(norm(p), p)  # not filled yet: identity (renormalised)
        assert not norm.filled
    out = norm(steps[3])
    assert bool(norm.filled) and int(norm.write_index) == 0
    usage = torch.stack([SwitchNorm.step_usage(p) for p in steps])
    torch.testing.assert_close(norm.usage, usage)
    expected = steps[3] / usage.mean(0).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(out.sum(1), torch.ones(2, 4, 4))


def test_step_usage_is_mass_over_mean():
    p = torch.zeros(1, 2, 1, 2)
    p[0, 0] = 1.0  # expert 0 takes everything
    torch.testing.assert_close(SwitchNorm.step_usage(p), torch.tensor([2.0, 0.0]))


def test_rotates_over_buffer():
    norm = SwitchNorm(3, buffer_size=2).train()
    for s in range(5):
        norm(probs(seed=s))
    assert int(norm.write_index) == 1
    torch.testing.assert_close(norm.usage[0], SwitchNorm.step_usage(probs(seed=4)))
    torch.testing.assert_close(norm.usage[1], SwitchNorm.step_usage(probs(seed=3)))


def test_eval_uses_but_does_not_change_buffer():
    norm = SwitchNorm(3, buffer_size=2).train()
    for s in range(2):
        norm(probs(seed=s))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.eval()
    p = probs(seed=9)
    out = norm(p)
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k])
    expected = p / norm.usage.mean(0).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected / expected.sum(1, keepdim=True))


def test_state_dict_round_trip_and_missing_buffer_warning():
    norm = SwitchNorm(3, buffer_size=2).train()
    for s in range(3):
        norm(probs(seed=s))
    state = norm.state_dict()
    assert set(state) == {"usage", "write_index", "filled"}
    other = SwitchNorm(3, buffer_size=2)
    other.load_state_dict(state)
    for k in state:
        torch.testing.assert_close(other.state_dict()[k], state[k])
    with pytest.warns(UserWarning, match="inference without the trained buffer gives poor results"):
        SwitchNorm(3, buffer_size=2).load_state_dict({}, strict=False)


def test_nan_step_is_skipped_with_warning():
    norm = SwitchNorm(3, buffer_size=4).train()
    norm(probs(seed=0))
    bad = probs(seed=1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        norm(bad)
    assert int(norm.write_index) == 1
    assert torch.isfinite(norm.usage).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm(probs(seed=2))
    assert int(norm.write_index) == 2


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"breadth=3"):
        SwitchNorm(3)(torch.rand(2, 4, 2, 2))
    with pytest.raises(ValueError, match="breadth must be >= 1"):
        SwitchNorm(0)


def test_gradient_checkpointing_records_each_step_once():
    import contextlib

    from torch.utils.checkpoint import checkpoint

    from dynconv import SwitchedConv2d
    from dynconv.nn import freeze_statistics

    torch.manual_seed(0)
    layer = SwitchedConv2d(3, 3, 3, padding=1, breadth=4, norm_buffer=2)
    twin = SwitchedConv2d(3, 3, 3, padding=1, breadth=4, norm_buffer=2)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 6)
    for step in range(3):
        plain = layer(x)
        plain.square().sum().backward()
        ckpt = checkpoint(twin, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), freeze_statistics()))
        ckpt.square().sum().backward()
        torch.testing.assert_close(ckpt, plain)
        assert int(twin.norm.write_index) == int(layer.norm.write_index)
        assert int(twin.recent_steps) == step + 1
    torch.testing.assert_close(twin.norm.usage, layer.norm.usage)
    torch.testing.assert_close(twin.weight.grad, layer.weight.grad)
    torch.testing.assert_close(twin.selector.weight.grad, layer.selector.weight.grad)
