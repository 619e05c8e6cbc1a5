"""Fast switched-conv backends (``gather``, ``triton``) against the float64 reference.

Every case draws fresh random inputs (the seed is in the failure message), runs the backend
with poisoned (NaN-filled) outputs, and compares the output and the gradients of ``x``,
``weight``, ``bias`` and ``gate`` with ``reference_switched_conv2d`` evaluated in float64 on
the same inputs. Without CUDA the Triton kernels run in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set in conftest), so those shapes stay tiny.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass

import pytest
import torch

from dynconv.ops import switched_conv2d
from dynconv.ops.switched import BACKENDS as HARD_BACKENDS
from dynconv.ops.switched import gather as switched_gather
from dynconv.ops.switched import reference_switched_conv2d, triton_switched_conv2d

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# relative tolerance on max |backend - reference| / max |reference|
TOL = {
    torch.float64: 1e-10,
    torch.float32: 5e-3 if ON_GPU else 2e-5,  # TF32 dots on GPU (cuDNN's default for convs too)
    torch.float16: 6e-3,
    torch.bfloat16: 4e-2,
}


@dataclass(frozen=True)
class Geom:
    n: int
    c: int
    o: int
    h: int
    w: int
    k: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def out_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip((self.h, self.w), self.k, self.stride, self.padding, self.dilation)
        )


GEOMS = {
    "k3": Geom(2, 3, 5, 7, 9, (3, 3), padding=(1, 1)),
    "k3-s2-p2-d2-odd": Geom(2, 4, 6, 9, 7, (3, 3), (2, 2), (2, 2), (2, 2)),
    "k1": Geom(2, 5, 4, 5, 6, (1, 1)),
    "k2-even": Geom(1, 5, 7, 6, 7, (2, 2)),
    "k5-s2": Geom(1, 3, 4, 7, 8, (5, 5), (2, 2), (1, 1)),
    "k7-p3": Geom(1, 2, 3, 5, 6, (7, 7), padding=(3, 3)),
    "k3x1-rect-stride": Geom(2, 3, 4, 7, 8, (3, 1), (2, 1), (1, 0)),
}


def make_case(geom: Geom, dtype: torch.dtype, breadth: int, layout: str = "contiguous", routing: str = "random"):
    """Random inputs in ``layout`` ('contiguous', 'channels_last', 'noncontiguous')."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    h_out, w_out = geom.out_size()
    kh, kw = geom.k

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    if layout == "noncontiguous":  # views made on the device, so they stay non-contiguous there
        x = randn(geom.n, geom.c, geom.h, 2 * geom.w)[..., ::2]
        weight = randn(breadth, geom.o, geom.c, kw, kh).transpose(-1, -2)
        gate = rand(geom.n, w_out, h_out).transpose(1, 2)
    else:
        x = randn(geom.n, geom.c, geom.h, geom.w)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        weight = randn(breadth, geom.o, geom.c, kh, kw)
        gate = rand(geom.n, h_out, w_out)
    bias = randn(geom.o)
    if routing == "random":
        index = torch.randint(0, breadth, (geom.n, h_out, w_out), generator=gen)
    elif routing == "one-expert":  # every pixel on the last expert
        index = torch.full((geom.n, h_out, w_out), breadth - 1, dtype=torch.int64)
    elif routing == "sparse":  # most experts get no pixel
        index = torch.randint(0, 2, (geom.n, h_out, w_out), generator=gen) * (breadth - 1)
    else:
        raise ValueError(routing)
    index = index.to(DEVICE)
    grad = randn(geom.n, geom.o, h_out, w_out)
    if layout == "noncontiguous":
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    return seed, x, weight, bias, index, gate, grad


def strided_leaf(t: torch.Tensor) -> torch.Tensor:
    """A grad-requiring leaf with ``t``'s values and strides (``clone`` would make a sliced
    tensor contiguous)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        leaf.copy_(t)
    return leaf.requires_grad_()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_against_reference(backend: str, geom: Geom, dtype, breadth, layout="contiguous", routing="random", **kw):
    seed, x, weight, bias, index, gate, grad = make_case(geom, dtype, breadth, layout, routing)
    leaves = [strided_leaf(t) for t in (x, weight, bias, gate)]
    if layout == "noncontiguous":
        assert not leaves[0].is_contiguous() and not leaves[1].is_contiguous() and not leaves[3].is_contiguous()
    if backend == "triton-det":
        y = triton_switched_conv2d(
            leaves[0], leaves[1], leaves[2], (index, leaves[3]), geom.stride, geom.padding, geom.dilation,
            deterministic=True,
        )
    else:
        y = switched_conv2d(
            leaves[0], leaves[1], leaves[2], (index, leaves[3]), geom.stride, geom.padding, geom.dilation, backend
        )
    y.backward(grad)

    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, gate)]
    y_ref = reference_switched_conv2d(
        ref_leaves[0], ref_leaves[1], ref_leaves[2], (index, ref_leaves[3]), geom.stride, geom.padding, geom.dilation
    )
    y_ref.backward(grad.double())

    tol = TOL[dtype]
    where = f"backend={backend} geom={geom} dtype={dtype} breadth={breadth} layout={layout} routing={routing} seed={seed}"
    assert y.dtype == dtype and y.shape == y_ref.shape, where
    assert not torch.isnan(y).any(), f"unwritten (NaN) output elements: {where}"
    errors = {"y": rel_err(y, y_ref)}
    for name, leaf, ref in zip(("x", "weight", "bias", "gate"), leaves, ref_leaves):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, f"grad {name}: {where}"
        assert leaf.grad.dtype == leaf.dtype, f"grad {name} dtype: {where}"
        errors[f"grad_{name}"] = rel_err(leaf.grad, ref.grad)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad} ({where})"
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), where
        assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last), where


# ----------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("geom", list(GEOMS), ids=list(GEOMS))
@pytest.mark.parametrize("breadth", [1, 2, 8, 64])
def test_gather_geometries_breadths(geom, breadth):
    check_against_reference("gather", GEOMS[geom], torch.float64, breadth)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("geom", ["k3", "k3-s2-p2-d2-odd"])
def test_gather_dtypes_layouts(dtype, layout, geom):
    check_against_reference("gather", GEOMS[geom], dtype, 8, layout)


@pytest.mark.parametrize("routing", ["one-expert", "sparse"])
@pytest.mark.parametrize("breadth", [2, 64])
def test_gather_skewed_routing(routing, breadth):
    check_against_reference("gather", GEOMS["k3"], torch.float32, breadth, routing=routing)


@pytest.mark.parametrize("backend", ["gather", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bad", [4, -1])
def test_index_out_of_range_is_refused(backend, bad):
    _, x, weight, bias, index, gate, _ = make_case(GEOMS["k3"], torch.float32, 4)
    index[0, 0, 0] = bad
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        switched_conv2d(x, weight, bias, (index, gate), padding=1, backend=backend)


def test_gather_dtype_mismatch_names_argument():
    _, x, weight, bias, index, gate, _ = make_case(GEOMS["k3"], torch.float32, 4)
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        switched_conv2d(x, weight.double(), bias, (index, gate), padding=1, backend="gather")


def test_gather_without_bias_and_partial_grads():
    geom = GEOMS["k3"]
    _, x, weight, _, index, gate, grad = make_case(geom, torch.float64, 4)
    w = weight.clone().requires_grad_()
    y = switched_conv2d(x, w, None, (index, gate), padding=1, backend="gather")
    y.backward(grad)
    w_ref = weight.clone().requires_grad_()
    reference_switched_conv2d(x, w_ref, None, (index, gate), padding=1).backward(grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("needs_x_grad", [True, False])
def test_gather_gate_gradient_with_zero_and_tiny_gates(dtype, needs_x_grad):
    """The gate gradient comes from the patch gradient divided by the gate; pixels whose gate
    is zero or tiny must get it recomputed, not 0/0 or a precision-starved quotient."""
    geom = GEOMS["k3-s2-p2-d2-odd"]
    _, x, weight, bias, index, gate, grad = make_case(geom, dtype, 4)
    tiny = torch.finfo(dtype).tiny
    flat = gate.view(-1)
    flat[::5] = 0.0
    flat[1::7] = tiny * 4  # below sqrt(tiny): recomputed
    flat[2::11] = -1e-3
    leaves = [x.clone().requires_grad_(needs_x_grad), weight.clone().requires_grad_(), bias.clone(), gate.clone()]
    leaves[3].requires_grad_()
    y = switched_conv2d(leaves[0], leaves[1], leaves[2], (index, leaves[3]), geom.stride, geom.padding, geom.dilation, "gather")
    y.backward(grad)
    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias, gate)]
    y_ref = reference_switched_conv2d(refs[0], refs[1], refs[2], (index, refs[3]), geom.stride, geom.padding, geom.dilation)
    y_ref.backward(grad.double())
    assert torch.isfinite(leaves[3].grad).all()
    assert rel_err(leaves[3].grad, refs[3].grad) <= TOL[dtype]
    assert rel_err(leaves[1].grad, refs[1].grad) <= TOL[dtype]
    if needs_x_grad:
        assert rel_err(leaves[0].grad, refs[0].grad) <= TOL[dtype]


@pytest.mark.parametrize("routing", ["random", "one-expert", "sparse"])
@pytest.mark.parametrize("breadth", [1, 3, 8])
@pytest.mark.parametrize("geom", ["k3", "k3-s2-p2-d2-odd", "k2-even"])
def test_gather_chunked_patches(monkeypatch, geom, breadth, routing):
    """Patch chunks smaller than an expert's segment: segments split over chunks (weight
    gradients accumulated across them) and several segments packed into one chunk."""
    g = GEOMS[geom]
    k = g.k[0] * g.k[1] * g.c
    monkeypatch.setattr(switched_gather, "PATCH_BYTES", 8 * k * 7)  # 7 float64 rows per chunk
    check_against_reference("gather", g, torch.float64, breadth, routing=routing)


@pytest.mark.parametrize("experts", [(1, 3, 4), (0, 1, 2)])
@pytest.mark.parametrize("patch_rows", [5, 10_000])
def test_gather_batched_experts(monkeypatch, experts, patch_rows):
    """Experts with equal pixel counts run as one padded ``bmm`` (consecutive ids: views of the
    weights; with gaps: copies), also when a chunk holds only some of them."""
    geom = GEOMS["k3"]
    k = geom.k[0] * geom.k[1] * geom.c
    monkeypatch.setattr(switched_gather, "PATCH_BYTES", 8 * k * patch_rows)
    _, x, weight, bias, _, gate, grad = make_case(geom, torch.float64, 6)
    h_out, w_out = geom.out_size()
    pattern = torch.tensor(experts)[torch.arange(geom.n * h_out * w_out) % len(experts)]
    index = pattern.view(geom.n, h_out, w_out)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
    y = switched_conv2d(leaves[0], leaves[1], leaves[2], (index, leaves[3]), 1, 1, 1, "gather")
    y.backward(grad)
    refs = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
    y_ref = reference_switched_conv2d(refs[0], refs[1], refs[2], (index, refs[3]), 1, 1, 1)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    for leaf, ref in zip(leaves, refs):
        torch.testing.assert_close(leaf.grad, ref.grad)


def test_gather_layout_covers_every_pixel_once():
    """Slots: every expert's pixels in order, chunks within the budget, padding bounded."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(300):
        breadth = int(torch.randint(1, 12, (1,), generator=gen))
        drawn = torch.randint(0, 40, (breadth,), generator=gen) * (torch.rand(breadth, generator=gen) < 0.7)
        counts = [int(v) for v in drawn]
        max_rows = int(torch.randint(1, 60, (1,), generator=gen))
        chunks, first, slots = switched_gather._layout(counts, max_rows)
        owned = {}
        pos = 0
        for ch in chunks:
            assert ch.start == pos and len(ch.experts) * ch.rows <= max(max_rows, switched_gather.ROW_BLOCKS)
            if len(ch.experts) == 1:
                assert ch.rows % switched_gather.ROW_BLOCKS == 0
            if len(ch.experts) > 1:
                size = len(ch.experts) * ch.rows
                assert size - sum(counts[e] for e in ch.experts) <= size * switched_gather.BATCH_WASTE
            for j, e in enumerate(ch.experts):
                owned.setdefault(e, []).append((ch.start + j * ch.rows, ch.rows, ch.accumulate))
            pos += len(ch.experts) * ch.rows
        assert pos == slots
        for e, cnt in enumerate(counts):
            if not cnt:
                assert e not in owned
                continue
            pieces = owned[e]
            assert pieces[0][0] == first[e] and not pieces[0][2]
            if len(pieces) > 1:  # split: contiguous, padded only at the end
                assert all(p[2] for p in pieces[1:])
                assert 0 <= sum(p[1] for p in pieces) - cnt < switched_gather.ROW_BLOCKS
                assert all(a[0] + a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            else:
                assert pieces[0][1] >= cnt


def test_gather_backward_is_bitwise_repeatable():
    """Same inputs, same bits (the fold and the weight-gradient sums run in a fixed order)."""
    geom = Geom(2, 8, 6, 12, 10, (3, 3), padding=(1, 1))
    _, x, weight, bias, index, gate, grad = make_case(geom, torch.float32, 4)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
        y = switched_conv2d(leaves[0], leaves[1], leaves[2], (index, leaves[3]), 1, 1, 1, "gather")
        y.backward(grad)
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gather_tapwise_fold_matches_scatter():
    """The atomics-free fold used off the CPU with ``deterministic`` equals the one-op fold."""
    gen = torch.Generator().manual_seed(0)
    rows, c, taps = 50, 3, torch.tensor([0, 1, 2, 7, 8, 9])
    base = torch.randperm(rows - 10, generator=gen)[:30]
    pm = torch.randn(30, taps.numel() * c, generator=gen, dtype=torch.float64)
    start = torch.randn(rows, c, generator=gen, dtype=torch.float64)
    expected = start.clone().index_add_(0, (base[:, None] + taps).view(-1), pm.view(-1, c))
    got = start.clone()
    switched_gather._fold_tapwise(got, pm, base, taps)
    torch.testing.assert_close(got, expected)


def test_auto_picks_gather_on_cpu():
    geom = GEOMS["k3"]
    _, x, weight, bias, index, gate, _ = make_case(geom, torch.float64, 4)
    y = switched_conv2d(x, weight, bias, (index, gate), padding=1)
    torch.testing.assert_close(y, reference_switched_conv2d(x, weight, bias, (index, gate), padding=1))
    assert "gather" in HARD_BACKENDS


# ----------------------------------------------------------------------------------- triton


@needs_triton
@pytest.mark.parametrize("geom", list(GEOMS), ids=list(GEOMS))
def test_triton_geometries(geom):
    layout = "channels_last" if geom in ("k3-s2-p2-d2-odd", "k1") else "contiguous"
    # interpreter time grows with taps x non-empty tiles: fewer experts for the big kernels
    breadth = 3 if geom in ("k5-s2", "k7-p3") else 8
    check_against_reference("triton", GEOMS[geom], torch.float32, breadth, layout)


@needs_triton
@pytest.mark.parametrize("breadth", [1, 2, 64])
def test_triton_breadths(breadth):
    # few pixels (one tile per non-empty expert) keep b=64 quick in the interpreter
    check_against_reference("triton", Geom(1, 3, 5, 6, 5, (3, 3), padding=(1, 1)), torch.float32, breadth)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom,layout", [("k3", "contiguous"), ("k3-s2-p2-d2-odd", "channels_last")])
def test_triton_half_dtypes(dtype, geom, layout):
    check_against_reference("triton", GEOMS[geom], dtype, 8, layout)


@needs_triton
def test_triton_noncontiguous():
    check_against_reference("triton", GEOMS["k3"], torch.float32, 8, "noncontiguous")


@needs_triton
@pytest.mark.parametrize("routing", ["one-expert", "sparse"])
def test_triton_skewed_routing(routing):
    check_against_reference("triton", GEOMS["k3"], torch.float32, 8, routing=routing)


@needs_triton
@pytest.mark.parametrize("geom,dtype", [("k3", torch.float32), ("k3x1-rect-stride", torch.float16)])
def test_triton_deterministic_matches_reference(geom, dtype):
    check_against_reference("triton-det", GEOMS[geom], dtype, 8, "channels_last")


@needs_triton
@pytest.mark.parametrize("breadth", [1, 7, 254, 255, 300])
def test_triton_tiles_cover_every_pixel_in_expert_order(breadth):
    """The tile plan (sorted on a narrowed key) keeps each expert's pixels in order, every
    tile inside one expert's segment, and every pixel in exactly one tile."""
    from dynconv.ops.switched import triton_launch as K

    gen = torch.Generator().manual_seed(breadth)
    index = torch.randint(0, breadth, (2, 9, 11), generator=gen)
    index.view(-1)[:3] = breadth - 1  # the largest id is present
    tiles = K._make_tiles(index, breadth, block_m=4)
    flat = index.view(-1)
    torch.testing.assert_close(tiles.order.long(), torch.argsort(flat, stable=True))
    counts = torch.bincount(flat, minlength=breadth)
    torch.testing.assert_close(tiles.seg.long(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    covered = torch.zeros(flat.numel(), dtype=torch.int64)
    for e, start, end in zip(tiles.tile_e.tolist(), tiles.tile_s.tolist(), tiles.tile_end.tolist()):
        if e < 0:
            continue
        assert tiles.seg[e] <= start < end <= tiles.seg[e + 1]
        covered[start : min(start + 4, end)] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("largest,dtype", [(255, torch.uint8), (256, torch.int16), (32767, torch.int16), (32768, torch.int64)])
def test_sort_key_dtype_is_the_narrowest_that_holds_the_largest_id(largest, dtype):
    from dynconv.ops.switched.functional import sort_key_dtype

    assert sort_key_dtype(largest) == dtype
    assert int(torch.tensor(largest).to(dtype)) == largest


@pytest.mark.parametrize("breadth", [255, 256, 257])
def test_gather_plan_sorts_pixels_by_expert_at_the_uint8_key_boundary(breadth):
    """gather's key holds the ids 0..breadth-1: uint8 up to breadth 256, int16 above."""
    gen = torch.Generator().manual_seed(breadth)
    index = torch.randint(0, breadth, (2, 9, 11), generator=gen)
    index.view(-1)[:3] = breadth - 1  # the largest id is present
    x = torch.randn(2, 1, 9, 11, dtype=torch.float64)
    weight = torch.randn(breadth, 1, 1, 1, 1, dtype=torch.float64)
    plan = switched_gather._plan(x, weight, index, (1, 1), (0, 0), (1, 1), torch.float64)
    flat = index.view(-1)
    in_slot_order = plan.slot_pixel[plan.slot_pixel < flat.numel()]
    torch.testing.assert_close(in_slot_order, torch.argsort(flat, stable=True))


@needs_triton
def test_triton_tiles_past_the_uint8_key():
    """At breadth 256 the searched ids 0..256 no longer fit a uint8 key."""
    test_triton_tiles_cover_every_pixel_in_expert_order(256)


@needs_triton
def test_triton_deterministic_is_bitwise_repeatable():
    geom = GEOMS["k3-s2-p2-d2-odd"]
    _, x, weight, bias, index, gate, grad = make_case(geom, torch.float32, 4, "channels_last")
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, gate)]
        y = triton_switched_conv2d(
            leaves[0], leaves[1], leaves[2], (index, leaves[3]), geom.stride, geom.padding, geom.dilation,
            deterministic=True,
        )
        y.backward(grad)
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_triton
def test_triton_matches_gather_on_cpu_bitwise_shapes():
    """Both fast backends agree (and keep the input's layout) on the same inputs."""
    geom = GEOMS["k3"]
    _, x, weight, bias, index, gate, _ = make_case(geom, torch.float32, 8, "channels_last")
    a = switched_conv2d(x, weight, bias, (index, gate), 1, 1, 1, "triton")
    b = switched_conv2d(x, weight, bias, (index, gate), 1, 1, 1, "gather")
    assert a.stride() == b.stride()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ON_GPU or not HAS_TRITON, reason="checks the CPU error without the interpreter")
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, x, weight, bias, index, gate, _ = make_case(GEOMS["k3"], torch.float32, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        switched_conv2d(x, weight, bias, (index, gate), padding=1, backend="triton")


# ----------------------------------------------------------------------------------- benchmark


def test_bench_switched_smoke(monkeypatch, tmp_path, capsys):
    """``python -m dynconv.bench switched`` runs end to end (tiny shape, one repetition)."""
    import json

    from dynconv import bench
    from dynconv.bench import switched as bench_switched

    monkeypatch.setitem(bench_switched.SHAPES, "tiny", (2, 4, 4, 8))
    out = tmp_path / "switched.json"
    code = bench.main(
        ["switched", "--device", "cpu", "--shapes", "tiny", "--breadths", "2,8", "--reps", "1", "--json", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| tiny | 8 | fp32 | gather |" in table
    payload = json.loads(out.read_text())
    methods = {(r["breadth"], r["method"]) for r in payload["rows"]}
    assert {(2, "nn.Conv2d"), (2, "reference"), (8, "gather")} <= methods
    assert all(r["note"] == "" for r in payload["rows"]), payload["rows"]
    assert bench.main(["nonexistent"]) == 2


def test_gather_scratch_reuse_never_aliases_outputs():
    """CPU scratch buffers are reused across calls; results of earlier calls must not change."""
    geom = GEOMS["k3"]
    for layout in ("contiguous", "channels_last"):
        _, x, weight, bias, index, gate, grad = make_case(geom, torch.float32, 4, layout)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
        y1 = switched_conv2d(leaves[0], leaves[1], leaves[2], (index, leaves[3]), 1, 1, 1, "gather")
        y1.backward(grad)
        kept = [y1.detach().clone()] + [t.grad.clone() for t in leaves]
        again = [t.clone().requires_grad_() for t in (2 * x, 3 * weight, bias, gate)]
        y2 = switched_conv2d(again[0], again[1], again[2], (index, again[3]), 1, 1, 1, "gather")  # same scratch
        y2.backward(-grad)
        for a, b in zip([y1.detach()] + [t.grad for t in leaves], kept):
            assert torch.equal(a, b)


def test_gather_scratch_made_under_inference_mode_serves_later_training(monkeypatch):
    """A scratch buffer first allocated inside ``torch.inference_mode`` (a latency measurement)
    is reused by a later forward/backward outside it (evaluation, training) without error."""
    monkeypatch.setattr(switched_gather._workspace, "store", {}, raising=False)  # fresh buffers
    _, x, weight, bias, index, gate, grad = make_case(GEOMS["k3"], torch.float32, 4, "contiguous")
    with torch.inference_mode():
        inferred = switched_conv2d(x, weight, bias, (index, gate), 1, 1, 1, "gather")
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
    y = switched_conv2d(leaves[0], leaves[1], leaves[2], (index, leaves[3]), 1, 1, 1, "gather")
    y.backward(grad)
    assert torch.equal(y.detach(), inferred) and all(t.grad is not None for t in leaves)
