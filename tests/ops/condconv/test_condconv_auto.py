"""``cond_conv2d(backend='auto')``: the choice between the PyTorch paths by shape (the cost
model in ``condconv/functional.py``), and that ``auto`` only ever picks a backend that runs on
the tensor's device."""

import math

import pytest
import torch

from dynconv.ops import cond_conv2d, dispatch
from dynconv.ops.condconv import BACKENDS, functional, reference_cond_conv2d
from dynconv.ops.condconv.functional import path_costs, pytorch_backend

ONE = (1, 1)


def _choice(
    channels: int, experts: int, hw: tuple[int, int], kernel: int = 3, groups: int = 1, stride: int = 1, batch: int = 128
) -> str:
    """``auto``'s PyTorch path for a 'same'-padded layer with C_in = C_out off CUDA (meta
    tensors: no memory)."""
    x = torch.empty(batch, channels, *hw, device="meta")
    weight = torch.empty(experts, channels, channels // groups, kernel, kernel, device="meta")
    return BACKENDS.choose("auto", x, weight, (stride, stride), (kernel // 2, kernel // 2), ONE, groups)


@pytest.mark.parametrize(
    "channels, side, experts, expected",
    [(64, 32, 4, "cpu"), (128, 16, 4, "cpu"), (256, 8, 4, "experts"), (512, 4, 4, "experts"),
     (64, 32, 8, "cpu"), (128, 16, 8, "cpu"), (256, 8, 8, "cpu"), (512, 4, 8, "experts")],
    ids=["C64-32x32-E4", "C128-16x16-E4", "C256-8x8-E4", "C512-4x4-E4",
         "C64-32x32-E8", "C128-16x16-E8", "C256-8x8-E8", "C512-4x4-E8"],
)
def test_resnet18_cifar_stages(channels, side, experts, expected):
    """Issue 12's shapes, as measured (docs/performance.md, fwd+bwd / dense conv): per-example
    kernels at 32x32 and 16x16 (1.1-2.4x against ~E x for the experts form); at 8x8 every
    expert's conv for E = 4 (4.1x against 4.4-5.2x) but per-example kernels for E = 8 (6.9-7.5x
    against 7.9-8.1x); every expert's conv at 4x4 (3.9-4.1x / 8.2-8.4x against 16-29x)."""
    assert _choice(channels, experts, (side, side)) == expected


def _weight_share(channels: int, experts: int, batch: int, taps: int = 9) -> float:
    """The experts path's per-call weight traffic, per example (MACs)."""
    return functional.ELEMENT_PASS_MACS * functional.EXPERT_WEIGHT_PASSES * experts * channels * channels * taps / batch


def _boundary_pixels(channels: int, experts: int, batch: int = 128, taps: int = 9) -> float:
    """Output pixels where the two estimates meet, for a stride-1 layer with C_in = C_out
    (input pixels = output pixels), solved from the model's constants in closed form."""
    kernel_elements = channels * channels * taps
    per_example_extra = kernel_elements * (4 * experts + functional.ELEMENT_PASS_MACS * functional.PER_EXAMPLE_KERNEL_PASSES)
    experts_per_pixel = 3 * (experts - 1) * kernel_elements + (
        functional.ELEMENT_PASS_MACS * functional.STACKED_INPUT_PASSES * experts * channels
    )
    return (per_example_extra - _weight_share(channels, experts, batch, taps)) / experts_per_pixel


@pytest.mark.parametrize("channels, experts", [(256, 4), (512, 8), (64, 2), (96, 3)])
def test_both_sides_of_the_boundary(channels, experts):
    """A 1 x P map: below the boundary the experts form, from it on per-example kernels."""
    boundary = _boundary_pixels(channels, experts)
    below, above = math.floor(boundary), math.floor(boundary) + 1
    assert 1 <= below < boundary < above
    assert _choice(channels, experts, (1, below)) == "experts"
    assert _choice(channels, experts, (1, above)) == "cpu"
    assert _choice(channels, experts, (below, 1)) == "experts"  # pixels count, not the map's shape


def test_boundary_shrinks_with_more_experts():
    """E dense convs cost more with every expert, the per-example mixing barely: the experts
    form's region shrinks as E grows (and at 16 experts even the 4x4 stage mixes kernels)."""
    bounds = [_boundary_pixels(512, e) for e in (2, 4, 8, 16)]
    assert bounds == sorted(bounds, reverse=True)
    assert _choice(512, 16, (4, 4)) == "cpu"


def test_strided_layers_count_output_pixels_for_the_convs():
    """A stride-2 layer from 8x8 to 4x4 costs its convs at 4x4: the experts form, as at 4x4;
    the same layer at stride 1 (8x8 output) mixes kernels (8 experts)."""
    assert _choice(512, 8, (8, 8), stride=2) == "experts"
    assert _choice(512, 8, (8, 8), stride=1) == "cpu"


def test_stacking_traffic_counts():
    """A depthwise layer's convs are cheap and its kernels tiny: copying the input E times
    costs more than per-example kernels from 2x2 maps on (on a 1x1 map, each example's 3x3
    kernels are 9x its input, 4 copies of the input less)."""
    for side in (2, 4, 8, 14, 32):
        assert _choice(256, 4, (side, side), groups=256) == "cpu", side
    assert _choice(256, 4, (1, 1), groups=256) == "experts"
    costs = path_costs(256, 256, 9, 256, 4, 16, 16)
    assert costs["experts"] > costs["cpu"]


@pytest.mark.parametrize("experts", [4, 8])
def test_small_batches_keep_per_example_kernels(experts):
    """The experts' weights pass through memory once per call, shared by the batch: below the
    batch where that share eats the per-example saving, kernels are mixed per example."""
    c, p = 512, 16
    costs = path_costs(c, c, 9, 1, experts, p, p)  # per example, without the weight share
    first = math.floor(_weight_share(c, experts, 1) / (costs["cpu"] - costs["experts"])) + 1
    assert first == {4: 6, 8: 18}[experts]  # as the comment in condconv/functional.py says
    assert _choice(c, experts, (4, 4), batch=first - 1) == "cpu"
    assert _choice(c, experts, (4, 4), batch=first) == "experts"
    assert _choice(c, experts, (4, 4), batch=1) == "cpu"


def test_export_with_a_dynamic_batch_counts_it_as_large(monkeypatch):
    """Under torch.export a symbolic batch is a large one: no guard on it, the experts path
    here (it would be 'cpu' for 1-5 examples), and the program is right at any batch."""
    from torch.export import Dim, export

    ran = []
    module = BACKENDS.module
    monkeypatch.setattr(BACKENDS, "module", lambda name: ran.append(name) or module(name))
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 48, 48, 3, 3, generator=gen)

    class Layer(torch.nn.Module):
        def forward(self, x, r):
            return cond_conv2d(x, weight, None, r, 1, 1)

    assert _choice(48, 4, (2, 2), batch=2) == "cpu" and _choice(48, 4, (2, 2), batch=16) == "experts"
    batch = Dim("batch", min=1, max=64)
    program = export(Layer(), (torch.randn(3, 48, 2, 2), torch.rand(3, 4)), dynamic_shapes=({0: batch}, {0: batch}))
    for n in (1, 9):
        x, r = torch.randn(n, 48, 2, 2, generator=gen), torch.rand(n, 4, generator=gen)
        torch.testing.assert_close(program.module()(x, r), reference_cond_conv2d(x, weight, None, r, 1, 1), rtol=1e-4, atol=1e-4)
    assert set(ran) == {"experts"}


SHAPES = [  # (C_in, C_out, H, W, k, groups, experts, stride)
    (512, 512, 4, 4, 3, 1, 4, 1),
    (64, 64, 32, 32, 3, 1, 8, 1),
    (8, 16, 3, 2, 1, 2, 2, 1),
    (256, 256, 14, 14, 5, 256, 4, 2),
    (32, 64, 1, 1, 3, 1, 16, 1),
]


@pytest.mark.parametrize("triton_installed", [True, False], ids=["triton", "no-triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}-{}-{}x{}-k{}-g{}-E{}-s{}".format(*s))
def test_auto_picks_a_backend_that_runs_on_the_device(shape, triton_installed, monkeypatch):
    """CPU tensors: a PyTorch path (never the Triton interpreter); a CUDA tensor: triton when
    installed, else a PyTorch path (a stand-in, so that this runs without a GPU)."""
    monkeypatch.setattr(dispatch, "TRITON_INSTALLED", triton_installed)
    c_in, c_out, h, w, k, groups, experts, stride = shape
    weight = torch.empty(experts, c_out, c_in // groups, k, k, device="meta")
    geometry = ((stride, stride), (k // 2, k // 2), ONE)
    x = torch.empty(2, c_in, h, w, device="meta")
    on_cpu = BACKENDS.choose("auto", x, weight, *geometry, groups)
    assert on_cpu in BACKENDS and on_cpu in ("cpu", "experts")

    class CudaTensor:  # what the rule reads of a CUDA tensor
        is_cuda = True
        shape = x.shape

    on_cuda = BACKENDS.choose("auto", CudaTensor(), weight, *geometry, groups)
    assert on_cuda in BACKENDS
    assert on_cuda == ("triton" if triton_installed else on_cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_on_a_real_cuda_tensor():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    weight = torch.randn(4, 8, 8, 3, 3, device="cuda")
    chosen = BACKENDS.choose("auto", x, weight, ONE, ONE, ONE, 1)
    assert chosen in BACKENDS and chosen == ("triton" if "triton" in BACKENDS else pytorch_backend(x, weight, ONE, ONE, ONE, 1))


@pytest.mark.parametrize("channels, side, expected", [(48, 2, "experts"), (8, 6, "cpu")])
def test_auto_runs_the_chosen_path(channels, side, expected, monkeypatch):
    """``cond_conv2d(backend='auto')`` on CPU runs the path the rule names, and matches the reference."""
    ran = []
    module = BACKENDS.module
    monkeypatch.setattr(BACKENDS, "module", lambda name: ran.append(name) or module(name))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, channels, side, side, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, channels, channels, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.rand(16, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = cond_conv2d(x, weight, None, r, 1, 1)
    y.square().sum().backward()
    assert ran == [expected, expected]  # forward and backward
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, r)]
    reference_cond_conv2d(leaves[0], leaves[1], None, leaves[2], 1, 1).square().sum().backward()
    for got, want in zip((x, weight, r), leaves):
        torch.testing.assert_close(got.grad, want.grad)
