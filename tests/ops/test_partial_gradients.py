"""Every fast backend, every subset of inputs that require grad, with and without a bias.

Why: a layer's input often needs no gradient (a first layer), experts can be frozen, and a
``torch.library`` custom op refuses to return one tensor twice, so a backward that hands the
same placeholder back for two skipped gradients fails only in some of these combinations.
Each requested gradient is checked against the float64 reference; the others stay ``None``.
"""

import itertools

import pytest
import torch

from dynconv.ops import cond_conv2d, involution2d, switched_conv2d
from dynconv.ops.condconv import BACKENDS as COND_BACKENDS
from dynconv.ops.condconv import reference_cond_conv2d
from dynconv.ops.involution import BACKENDS as INV_BACKENDS
from dynconv.ops.involution import reference_involution2d
from dynconv.ops.switched import BACKENDS as HARD_BACKENDS
from dynconv.ops.switched import reference_switched_conv2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 5e-3 if DEVICE == "cuda" else 1e-4


def _subsets(names):
    """Every non-empty subset of ``names``."""
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def _bias_cases(names):
    """``(with_bias, wanted)`` pairs: every subset with a bias, those without ``'bias'`` without one."""
    return [(True, w) for w in _subsets(names)] + [(False, w) for w in _subsets(names) if "bias" not in w]


def _bias_case_id(case) -> str:
    with_bias, wanted = case
    return "-".join(wanted) + ("" if with_bias else "-nobias")


def _check(fast, reference, inputs: dict, wanted: tuple[str, ...]) -> None:
    """Run ``fast`` and the float64 ``reference`` on ``inputs`` with only ``wanted`` requiring grad."""
    gen = torch.Generator().manual_seed(0)
    leaves = {k: (v.detach().clone().requires_grad_(k in wanted) if v is not None else None) for k, v in inputs.items()}
    ref = {k: (v.detach().double().requires_grad_(k in wanted) if v is not None else None) for k, v in inputs.items()}
    y = fast(**leaves)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(g.to(y.device, y.dtype))
    reference(**ref).backward(g)
    for name, leaf in leaves.items():
        if leaf is None:
            continue
        if name not in wanted:
            assert leaf.grad is None, f"grad {name} was not asked for"
            continue
        assert leaf.grad is not None, f"grad {name} missing"
        want = ref[name].grad
        err = ((leaf.grad.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err < TOL, f"grad {name}: rel err {err:.2e}"


def _random_inputs(seed: int, **shapes) -> dict:
    """Named inputs on ``DEVICE``: ``randn`` of each shape, ``rand`` for names ending in
    ``'gate'`` or ``'weights'`` (probabilities), ``None`` where the shape is ``None``."""
    gen = torch.Generator().manual_seed(seed)

    def make(name, shape):
        if shape is None:
            return None
        draw = torch.rand if name.endswith(("gate", "weights")) else torch.randn
        return draw(*shape, generator=gen).to(DEVICE)

    return {name: make(name, shape) for name, shape in shapes.items()}


COND_FAST = [b for b in ("cpu", "experts", "triton") if b in COND_BACKENDS and not (b == "cpu" and DEVICE == "cuda")]


@pytest.mark.parametrize("backend", COND_FAST)
@pytest.mark.parametrize("case", _bias_cases(("x", "weight", "bias", "routing_weights")), ids=_bias_case_id)
def test_cond_conv2d(backend, case):
    with_bias, wanted = case
    inputs = _random_inputs(
        1, x=(2, 4, 5, 5), weight=(3, 4, 2, 3, 3), bias=(3, 4) if with_bias else None, routing_weights=(2, 3)
    )
    _check(
        lambda **a: cond_conv2d(**a, stride=1, padding=1, groups=2, backend=backend),
        lambda **a: reference_cond_conv2d(**a, stride=1, padding=1, groups=2),
        inputs, wanted,
    )


INV_FAST = [b for b in ("cpu", "triton") if b in INV_BACKENDS and not (b == "cpu" and DEVICE == "cuda")]


@pytest.mark.parametrize("backend", INV_FAST)
@pytest.mark.parametrize("wanted", _subsets(("x", "kernel")), ids="-".join)
def test_involution2d(backend, wanted):
    inputs = _random_inputs(2, x=(2, 4, 5, 5), kernel=(2, 2, 9, 5, 5))
    _check(
        lambda **a: involution2d(a["x"], a["kernel"], 3, 1, 1, groups=2, backend=backend),
        lambda **a: reference_involution2d(a["x"], a["kernel"], 3, 1, 1, groups=2),
        inputs, wanted,
    )


SWITCHED_FAST = [b for b in ("gather", "triton") if b in HARD_BACKENDS and not (b == "gather" and DEVICE == "cuda")]


@pytest.mark.parametrize("backend", SWITCHED_FAST)
@pytest.mark.parametrize("case", _bias_cases(("x", "weight", "bias", "gate")), ids=_bias_case_id)
def test_switched_conv2d(backend, case):
    with_bias, wanted = case
    inputs = _random_inputs(3, x=(2, 4, 5, 5), weight=(3, 6, 4, 3, 3), bias=(6,) if with_bias else None, gate=(2, 5, 5))
    index = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run(fn, **a):
        return fn(a["x"], a["weight"], a["bias"], (index, a["gate"]), 1, 1)

    _check(
        lambda **a: run(lambda *p: switched_conv2d(*p, backend=backend), **a),
        lambda **a: run(reference_switched_conv2d, **a),
        inputs, wanted,
    )
