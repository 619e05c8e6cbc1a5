"""Fast ``cond_conv2d`` backends against the float64 reference: outputs and all gradients.

Without CUDA the Triton kernels run through Triton's interpreter (tiny shapes). Outputs
are poisoned with NaN before launch so unwritten elements fail the comparison.
"""

import pytest
import torch

from dynconv.ops import cond_conv2d
from dynconv.ops.condconv import BACKENDS, reference_cond_conv2d
from dynconv.ops.condconv import cpu as condconv_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in BACKENDS
FAST_BACKENDS = ["cpu", "experts", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]

# max |fast - reference| / max |reference|; the reference is float64 math on the same (rounded) inputs
TOL = {torch.float32: 5e-3 if DEVICE == "cuda" else 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_case(
    backend, n, cin, cout, hw, k, groups, experts, stride, padding, dilation,
    dtype=torch.float32, bias=True, channels_last=False, noncontig=False, seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype)
    weight = (torch.randn(experts, cout, cin // groups, k, k, generator=gen) / k).to(dtype)
    b = torch.randn(experts, cout, generator=gen).to(dtype) if bias else None
    r = torch.rand(n, experts, generator=gen).to(dtype)

    # float64 reference on the rounded inputs
    ref_in = [t.double().requires_grad_() if t is not None else None for t in (x, weight, b, r)]
    y_ref = reference_cond_conv2d(ref_in[0], ref_in[1], ref_in[2], ref_in[3], stride, padding, dilation, groups)
    dy = torch.randn(y_ref.shape, generator=gen).to(dtype)
    y_ref.backward(dy.double())

    xd = x.to(DEVICE)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    if noncontig:
        big = torch.zeros(n, cin, h, 2 * w, dtype=dtype, device=DEVICE)
        big[..., ::2] = xd
        xd = big[..., ::2]
        assert not xd.is_contiguous()
    args = [xd, weight.to(DEVICE), b.to(DEVICE) if bias else None, r.to(DEVICE)]
    for t in args:
        if t is not None:
            t.requires_grad_()
    y = cond_conv2d(*args, stride, padding, dilation, groups, backend=backend)
    assert y.dtype == dtype and y.shape == y_ref.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = dy.to(DEVICE)
    if noncontig:
        g = g[:, :, :, :1].expand_as(y) if y.shape[-1] > 1 else g
        dy_used = g.double().cpu()
        ref_in = [t.detach().requires_grad_() if t is not None else None for t in ref_in]
        y_ref2 = reference_cond_conv2d(ref_in[0], ref_in[1], ref_in[2], ref_in[3], stride, padding, dilation, groups)
        y_ref2.backward(dy_used)
    y.backward(g)
    tol = TOL[dtype]
    assert torch.isfinite(y).all()
    assert _rel(y.detach().cpu(), y_ref.detach()) < tol, "output"
    names = ("x", "weight", "bias", "routing_weights")
    for name, got, want in zip(names, args, ref_in):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == dtype, name
        assert torch.isfinite(got.grad).all(), f"grad {name} has NaN (unwritten element?)"
        err = _rel(got.grad.cpu(), want.grad)
        assert err < tol, f"grad {name}: rel err {err:.2e} >= {tol:.0e}"


# (n, cin, cout, (h, w), k, groups, experts, stride, padding, dilation, options)
CASES = {
    "dense": (2, 16, 16, (6, 5), 3, 1, 3, 1, 1, 1, {}),
    "dense-wide-stride2-nobias": (2, 20, 40, (7, 6), 3, 1, 4, 2, 1, 1, {"bias": False}),
    "groups2-dilation2-cl": (3, 12, 8, (7, 7), 3, 2, 2, 1, 2, 2, {"channels_last": True}),
    "depthwise-k3": (2, 6, 6, (7, 7), 3, 6, 4, 1, 1, 1, {}),
    "depthwise-k3-cl": (2, 8, 8, (6, 5), 3, 8, 4, 1, 1, 1, {"channels_last": True}),
    "depthwise-k5-mult2-stride2-cl": (2, 6, 12, (8, 7), 5, 6, 3, 2, 2, 1, {"channels_last": True}),
    "depthwise-k3-dil2-noncontig": (2, 5, 5, (6, 6), 3, 5, 2, 1, 2, 2, {"noncontig": True}),
    "depthwise-k5-dil2-stride2-mult3": (3, 4, 12, (11, 9), 5, 4, 3, 2, 3, 2, {}),
    "dense-noncontig-rect": (2, 8, 16, (5, 6), (3), 1, 2, (1, 2), (1, 0), 1, {"noncontig": True}),
    "dense-bf16": (2, 16, 24, (5, 5), 3, 1, 4, 1, 1, 1, {"dtype": torch.bfloat16}),
    "dense-fp16-cl": (2, 16, 16, (5, 6), 3, 2, 3, 1, 1, 1, {"dtype": torch.float16, "channels_last": True}),
    "depthwise-bf16": (2, 8, 8, (6, 6), 5, 8, 3, 1, 2, 1, {"dtype": torch.bfloat16}),
    "depthwise-fp16": (2, 8, 8, (6, 6), 3, 8, 8, 2, 1, 1, {"dtype": torch.float16}),
}


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    n, cin, cout, hw, k, groups, e, s, p, d, opts = CASES[case]
    run_case("triton", n, cin, cout, hw, k, groups, e, s, p, d, **opts)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", ["dense", "dense-wide-stride2-nobias", "groups2-dilation2-cl", "dense-bf16"])
def test_triton_premixed_kernels_match_reference(case, monkeypatch):
    """The large-image path (experts mixed once by a GEMM) against the reference."""
    from dynconv.ops.condconv import triton_launch as condconv_triton

    monkeypatch.setattr(condconv_triton, "PREMIX_MIN_P_TILES", 1)
    n, cin, cout, hw, k, groups, e, s, p, d, opts = CASES[case]
    run_case("triton", n, cin, cout, hw, k, groups, e, s, p, d, **opts)


CPU_CASES = [c for c in CASES if CASES[c][-1].get("dtype") != torch.float16]

# the experts backend is the one 'auto' takes on small maps: those (forward: one conv per
# expert, up to PER_EXPERT_FORWARD_MAX_PIXELS = 64 output pixels), and large ones (one stacked conv)
EXPERTS_CASES = {
    **CASES,
    "map-8x8-depthwise-cl": (3, 8, 16, (8, 8), 3, 8, 4, 1, 1, 1, {"channels_last": True}),
    "map-9x8-groups2": (2, 8, 6, (9, 8), 3, 2, 3, 1, 1, 1, {}),
    "map-4x4-wide": (3, 32, 32, (4, 4), 3, 1, 4, 1, 1, 1, {}),
    "map-4x4-wide-cl-8-experts": (3, 32, 24, (4, 4), 3, 1, 8, 1, 1, 1, {"channels_last": True}),
    "map-2x2-groups4-stride2": (2, 16, 8, (2, 3), 3, 4, 3, 2, 1, 1, {}),
    "map-1x1-k1": (4, 12, 10, (1, 1), 1, 1, 2, 1, 0, 1, {}),
    "map-30x26": (2, 4, 6, (30, 26), 3, 1, 3, 1, 1, 1, {}),
    "map-30x26-depthwise-cl": (2, 4, 8, (30, 26), 5, 4, 2, 1, 2, 1, {"channels_last": True}),
    "map-30x26-stride2-dilation3-nobias-cl": (2, 6, 4, (30, 26), 3, 2, 4, 2, 3, 3, {"channels_last": True, "bias": False}),
}


@pytest.mark.parametrize("case", CPU_CASES)
def test_cpu_matches_reference(case):
    n, cin, cout, hw, k, groups, e, s, p, d, opts = CASES[case]
    run_case("cpu", n, cin, cout, hw, k, groups, e, s, p, d, **opts)


@pytest.mark.parametrize("case", list(EXPERTS_CASES))
def test_experts_matches_reference(case):
    """Every expert's conv as one dense conv: outputs and the gradients of x, the experts, the
    bias and the routing weights equal the float64 reference (fp16/bf16 run in fp32 off the GPU)."""
    n, cin, cout, hw, k, groups, e, s, p, d, opts = EXPERTS_CASES[case]
    run_case("experts", n, cin, cout, hw, k, groups, e, s, p, d, **opts)


def test_experts_stacked_input_layout():
    """The stacked input is ordered (group, expert, channel), in the input's memory format, and
    the stacked weight matches it: one conv of the two is the sum of the experts' convs."""
    from dynconv.ops.condconv import experts as condconv_experts

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    r = torch.rand(2, 3, generator=gen)
    stacked = condconv_experts.stack_input(x, r, 2, torch.float32)
    assert stacked.shape == (2, 18, 5, 4) and stacked.is_contiguous(memory_format=torch.channels_last)
    for j in range(2):  # group
        for e in range(3):  # expert
            torch.testing.assert_close(
                stacked[:, (j * 3 + e) * 3 : (j * 3 + e + 1) * 3], r[:, e, None, None, None] * x[:, j * 3 : (j + 1) * 3]
            )
    w = torch.randn(3, 4, 3, 3, 3, generator=gen)
    got = torch.nn.functional.conv2d(stacked, condconv_experts.stacked_weight(w), None, 1, 1, 1, 2)
    want = sum(r[:, e, None, None, None] * torch.nn.functional.conv2d(x, w[e], None, 1, 1, 1, 2) for e in range(3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", ["one-per-chunk", "uneven"])
@pytest.mark.parametrize(
    "case", ["dense", "groups2-dilation2-cl", "depthwise-k5-mult2-stride2-cl", "depthwise-k3-dil2-noncontig", "dense-noncontig-rect"]
)
def test_cpu_example_chunks_match_reference(case, split, monkeypatch):
    """The CPU path runs the batch in chunks of examples; any split gives the reference."""
    if split == "one-per-chunk":
        monkeypatch.setattr(condconv_cpu, "CHUNK_BYTES", 1)
    else:
        monkeypatch.setattr(condconv_cpu, "_chunks", lambda x, *_: [(0, 2), (2, 3), (3, x.shape[0])])
    n, cin, cout, hw, k, groups, e, s, p, d, opts = CASES[case]
    run_case("cpu", 5, cin, cout, hw, k, groups, e, s, p, d, **opts)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("nhwc_fold", [False, True])
@pytest.mark.parametrize("case", ["groups2-dilation2-cl", "depthwise-k3-cl", "depthwise-k5-mult2-stride2-cl"])
def test_cpu_channels_last_folds_match_reference(case, nhwc_fold, chunked, monkeypatch):
    """A channels_last batch folded either way (``NHWC_FOLD_MIN_PIXELS``), whole or in chunks, gives the reference."""
    for kind in ("dense", "depthwise"):
        monkeypatch.setitem(condconv_cpu.NHWC_FOLD_MIN_PIXELS, kind, 0 if nhwc_fold else 10**9)
    if chunked:
        monkeypatch.setattr(condconv_cpu, "_chunks", lambda x, *_: [(0, 2), (2, 3), (3, x.shape[0])])
    n, cin, cout, hw, k, groups, e, s, p, d, opts = CASES[case]
    run_case("cpu", 4, cin, cout, hw, k, groups, e, s, p, d, **opts)


@pytest.mark.parametrize("kernel_hw", [(3, 1), (1, 5), (2, 3)])
def test_cpu_nhwc_fold_rectangular_kernels(kernel_hw, monkeypatch):
    """The NHWC fold mixes the experts in channels_last kernel order (out, kH, kW, in/g) and
    permutes the experts' gradient back: rectangular kernels and groups would expose a
    swapped axis. Chunked, against the float64 reference."""
    monkeypatch.setitem(condconv_cpu.NHWC_FOLD_MIN_PIXELS, "dense", 0)
    monkeypatch.setattr(condconv_cpu, "_chunks", lambda x, *_: [(0, 2), (2, x.shape[0])])
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 6, 7, 8, generator=gen)
    weight = torch.randn(3, 4, 3, *kernel_hw, generator=gen)
    bias = torch.randn(3, 4, generator=gen)
    routing = torch.rand(3, 3, generator=gen)
    dy = None
    grads = []
    for double in (True, False):
        inputs = [t.double() if double else t for t in (x, weight, bias, routing)]
        if not double:
            inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        inputs = [t.clone().requires_grad_() for t in inputs]
        if double:
            y = reference_cond_conv2d(*inputs, (1, 1), (1, 1), (1, 1), 2)
            dy = torch.randn(y.shape, generator=gen)
        else:
            y = cond_conv2d(*inputs, (1, 1), (1, 1), (1, 1), 2, backend="cpu")
            assert y.is_contiguous(memory_format=torch.channels_last)
        y.backward(dy.to(y.dtype))
        grads.append([y.detach().double()] + [t.grad.double() for t in inputs])
    for name, want, got in zip(("output", "x", "weight", "bias", "routing_weights"), *grads):
        assert _rel(got, want) < 1e-5, name


def test_cpu_nhwc_fold_layout():
    """The NHWC fold holds the same values as the NCHW one, channels_last; the shape-only
    stand-in has the same shape and strides."""
    x = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    folded = condconv_cpu._fold(x, nhwc=True)
    assert folded.shape == (1, 12, 5, 6) and folded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(folded, condconv_cpu._fold(x), rtol=0, atol=0)
    assert condconv_cpu._empty_fold(x, nhwc=True).stride() == folded.stride()
    assert condconv_cpu._empty_fold(x, nhwc=False).shape == folded.shape
    torch.testing.assert_close(condconv_cpu._unfold(folded, 3), x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "experts"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_channels_last_input_gradient_only(kernel, backend):
    """Frozen experts and routing, a channels_last depthwise layer: only grad x is computed
    (the conv's input is replaced by a shape-only tensor, NaN-poisoned in tests) and it
    matches the reference."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 7, 6, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(2, 8, 1, kernel, kernel, generator=gen)
    r = torch.rand(3, 2, generator=gen)
    y = cond_conv2d(x, w, None, r, 1, kernel // 2, 1, 8, backend=backend)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    x_ref = x.detach().double().requires_grad_()
    reference_cond_conv2d(x_ref, w.double(), None, r.double(), 1, kernel // 2, 1, 8).backward(g.double())
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert _rel(x.grad, x_ref.grad) < TOL[torch.float32]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_partial_gradients(backend):
    """Only routing weights require grad (frozen experts, fixed input): the skipped gradients stay None."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 5, generator=gen, device="cpu").to(DEVICE)
    w = torch.randn(3, 8, 8, 3, 3, generator=gen).to(DEVICE)
    b = torch.randn(3, 8, generator=gen).to(DEVICE)
    r = torch.rand(2, 3, generator=gen).to(DEVICE).requires_grad_()
    cond_conv2d(x, w, b, r, 1, 1, backend=backend).square().sum().backward()
    r_ref = r.detach().cpu().double().requires_grad_()
    reference_cond_conv2d(x.cpu().double(), w.cpu().double(), b.cpu().double(), r_ref, 1, 1).square().sum().backward()
    assert x.grad is None and w.grad is None
    assert _rel(r.grad.cpu(), r_ref.grad) < TOL[torch.float32] * 10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(3, 8, 4, 3, 3, generator=gen).to(DEVICE).requires_grad_()
    r = torch.rand(2, 3, generator=gen).to(DEVICE).requires_grad_()

    def f(x, w, r):
        return cond_conv2d(x, w, None, torch.softmax(r, 1), 1, 1, 1, 2, backend=backend).square().mean()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, r)
    loss.backward()
    grads = [t.grad.clone() for t in (x, w, r)]
    for t in (x, w, r):
        t.grad = None
    f(x, w, r).backward()
    for got, t in zip(grads, (x, w, r)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


def test_auto_picks_cpu_backend_on_cpu():
    assert "cpu" in BACKENDS
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(2, 4, 4, 3, 3)
    r = torch.rand(1, 2)
    torch.testing.assert_close(cond_conv2d(x, w, None, r, 1, 1), reference_cond_conv2d(x, w, None, r, 1, 1))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_errors_name_the_argument():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 4, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    r = torch.rand(1, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="x must be one of"):
        cond_conv2d(x, w, None, r, 1, 1, backend="triton")
    with pytest.raises(TypeError, match="weight dtype must match x"):
        cond_conv2d(x.float(), w, None, r, 1, 1, backend="triton")
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        cond_conv2d(x.float(), w.float(), None, r, 1, "same", backend="triton")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("groups", [1, 8])
def test_empty_batch(backend, groups):
    x = torch.randn(0, 8, 5, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 8, 8 // groups, 3, 3, device=DEVICE, requires_grad=True)
    r = torch.rand(0, 2, device=DEVICE, requires_grad=True)
    y = cond_conv2d(x, w, None, r, 1, 1, groups=groups, backend=backend)
    assert y.shape == (0, 8, 5, 5)
    y.sum().backward()
    assert w.grad is not None and not w.grad.any()
