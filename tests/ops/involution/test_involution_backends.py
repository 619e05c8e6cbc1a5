"""Fast ``involution2d`` backends against the float64 unfold reference: output, grad x, grad kernel.

Without CUDA the Triton kernels run through Triton's interpreter (tiny shapes). Outputs
are poisoned with NaN before launch so unwritten elements fail the comparison.
"""

import pytest
import torch

from dynconv._checks import conv_output_size
from dynconv.ops import involution2d
from dynconv.ops.involution import BACKENDS, reference_involution2d
from dynconv.ops.involution.functional import UNFOLD_MAX_PIXELS, pytorch_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in BACKENDS
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_case(backend, n, c, hw, k, groups, stride, padding, dilation=1, dtype=torch.float32,
             channels_last=False, noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    ho, wo = (conv_output_size(v, k, stride, padding, dilation) for v in (h, w))
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    kernel = torch.randn(n, groups, k * k, ho, wo, generator=gen).to(dtype)
    dy = torch.randn(n, c, ho, wo, generator=gen).to(dtype)

    xr, kr = x.double().requires_grad_(), kernel.double().requires_grad_()
    y_ref = reference_involution2d(xr, kr, k, stride, padding, dilation, groups)
    y_ref.backward(dy.double())

    xd = x.to(DEVICE)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    kd = kernel.to(DEVICE)
    if noncontig:
        xd = xd.transpose(2, 3).contiguous().transpose(2, 3)  # same values, W-major strides
        kd = torch.cat([kd, kd], 2)[:, :, : k * k]  # a view with a wider tap stride
        assert not xd.is_contiguous() and not kd.is_contiguous()
    xd.requires_grad_()
    kd.requires_grad_()
    y = involution2d(xd, kd, k, stride, padding, dilation, groups, backend=backend)
    assert y.dtype == dtype and y.shape == y_ref.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(dy.to(DEVICE))
    tol = TOL[dtype]
    for name, got, want in (("output", y.detach(), y_ref.detach()), ("x", xd.grad, xr.grad), ("kernel", kd.grad, kr.grad)):
        assert got is not None and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"{name} has NaN (unwritten element?)"
        err = _rel(got.cpu(), want)
        assert err < tol, f"{name}: rel err {err:.2e} >= {tol:.0e}"


# (n, c, (h, w), K, groups, stride, padding, dilation, options)
CASES = {
    "k3-s1-g4": (2, 16, (7, 6), 3, 4, 1, 1, 1, {}),
    "k3-s2-g3": (2, 12, (8, 9), 3, 3, 2, 1, 1, {}),
    "k5-s1-g2-cl": (2, 64, (6, 6), 5, 2, 1, 2, 1, {"channels_last": True}),
    "k7-s2-g1": (1, 8, (9, 9), 7, 1, 2, 3, 1, {}),
    "k3-dil2-depthwise": (2, 6, (7, 7), 3, 6, 1, 2, 2, {}),
    "k3-one-group-tiles-cl": (2, 64, (6, 7), 3, 2, 2, 1, 1, {"channels_last": True}),
    "k3-noncontig": (2, 8, (6, 5), 3, 2, 1, 1, 1, {"noncontig": True}),
    "k3-nopad-cl": (2, 16, (6, 7), 3, 4, 1, 0, 1, {"channels_last": True}),
    "k3-bf16": (2, 16, (6, 6), 3, 4, 1, 1, 1, {"dtype": torch.bfloat16}),
    "k5-s2-fp16-cl": (2, 32, (7, 7), 5, 2, 2, 2, 1, {"dtype": torch.float16, "channels_last": True}),
    "k7-bf16": (1, 16, (8, 8), 7, 1, 1, 3, 1, {"dtype": torch.bfloat16}),
}


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    n, c, hw, k, g, s, p, d, opts = CASES[case]
    run_case("triton", n, c, hw, k, g, s, p, d, **opts)


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_matches_reference(case):
    n, c, hw, k, g, s, p, d, opts = CASES[case]
    run_case("cpu", n, c, hw, k, g, s, p, d, **opts)


def test_cpu_chunks_the_batch(monkeypatch):
    """Several batch chunks (a small chunk budget) give the same result as one."""
    from dynconv.ops.involution import cpu as involution_cpu

    monkeypatch.setattr(involution_cpu, "CHUNK_ELEMENTS", 16 * 5 * 5)
    run_case("cpu", 5, 16, (5, 5), 3, 4, 1, 1)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))])
def test_kernel_only_gradient(backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(DEVICE)
    kernel = torch.randn(2, 2, 9, 5, 5, generator=gen).to(DEVICE).requires_grad_()
    involution2d(x, kernel, 3, 1, 1, 1, 2, backend=backend).square().sum().backward()
    kr = kernel.detach().cpu().double().requires_grad_()
    reference_involution2d(x.cpu().double(), kr, 3, 1, 1, 1, 2).square().sum().backward()
    assert x.grad is None
    assert _rel(kernel.grad.cpu(), kr.grad) < 1e-4


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(DEVICE).requires_grad_()
    kernel = torch.randn(2, 2, 9, 3, 3, generator=gen).to(DEVICE).requires_grad_()

    def f(x, kernel):
        return involution2d(torch.relu(x), kernel, 3, 2, 1, 1, 2, backend=backend).square().mean()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, kernel)
    loss.backward()
    grads = [x.grad.clone(), kernel.grad.clone()]
    x.grad = kernel.grad = None
    f(x, kernel).backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], kernel.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size, expected", [(4, "reference"), (5, "reference"), (6, "cpu"), (8, "cpu")])
def test_auto_picks_cpu_backend_except_on_tiny_maps(size, expected):
    """Off CUDA, ``auto`` runs the ``cpu`` backend, and the unfold reference on output maps
    under UNFOLD_MAX_PIXELS (32) pixels; the result equals the reference's either way."""
    assert "cpu" in BACKENDS and UNFOLD_MAX_PIXELS == 32
    x = torch.randn(2, 4, size, size, requires_grad=True)
    kernel = torch.randn(2, 2, 9, size, size, requires_grad=True)
    assert pytorch_backend(x, (size, size)) == expected
    assert BACKENDS.choose("auto", x, (size, size)) == expected
    y = involution2d(x, kernel, 3, 1, 1, 1, 2)
    torch.testing.assert_close(y, reference_involution2d(x, kernel, 3, 1, 1, 1, 2))
    y.square().sum().backward()
    assert x.grad is not None and kernel.grad is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_errors_name_the_argument():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    kernel = torch.randn(1, 2, 9, 5, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="x must be one of"):
        involution2d(x, kernel, 3, 1, 1, 1, 2, backend="triton")
    with pytest.raises(TypeError, match="kernel dtype must match x"):
        involution2d(x.float(), kernel, 3, 1, 1, 1, 2, backend="triton")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))])
def test_empty_batch(backend):
    x = torch.randn(0, 8, 5, 5, device=DEVICE, requires_grad=True)
    kernel = torch.randn(0, 2, 9, 5, 5, device=DEVICE, requires_grad=True)
    y = involution2d(x, kernel, 3, 1, 1, 1, 2, backend=backend)
    assert y.shape == (0, 8, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and kernel.grad.shape == kernel.shape
