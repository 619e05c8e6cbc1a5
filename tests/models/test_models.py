"""Model registry, shapes and gradients of every model, conversion, the EMA codebook, matched FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import dynconv
from dynconv import CondConv2d, Involution2d, SwitchedConv2d
from dynconv.models import (
    MODELS,
    VectorQuantizerEMA,
    build_model,
    match_flops,
    model_options,
    model_task,
)
from dynconv.models.flops import flops_per_pixel
from dynconv.nn import LambdaSelector

NAMES = ("resnet18_cifar", "sr_plain", "sr_switched", "sr_condconv", "sr_involution", "edsr_baseline", "rrdb", "vqvae")

# tiny versions of every model: (name, options, input shape, expected output shape)
TINY = [
    ("resnet18_cifar", {"width": 4, "num_classes": 7}, (2, 3, 16, 16), (2, 7)),
    ("resnet18_cifar", {"width": 4, "block_conv2": "switched", "layer": {"breadth": 2}}, (2, 3, 16, 16), (2, 10)),
    ("resnet18_cifar", {"width": 4, "block_conv2": "condconv", "layer": {"num_experts": 2}}, (2, 3, 16, 16), (2, 10)),
    ("resnet18_cifar", {"width": 16, "block_conv2": "involution"}, (2, 3, 16, 16), (2, 10)),
    ("resnet18_cifar", {"width": 4, "block_conv2": "condconv", "block_conv2_stages": [1, 2],
                        "layer": {"num_experts": 4, "routing": "softmax", "temperature": 30.0}}, (2, 3, 16, 16), (2, 10)),
    ("sr_plain", {"channels": 8}, (2, 3, 6, 5), (2, 3, 12, 10)),
    ("sr_plain", {"channels": 8, "scale": 3, "num_layers": 2}, (2, 3, 6, 5), (2, 3, 18, 15)),
    ("sr_switched", {"channels": 8, "layer": {"breadth": 3}}, (2, 3, 6, 5), (2, 3, 12, 10)),
    ("sr_condconv", {"channels": 8, "scale": 4, "layer": {"num_experts": 2, "routing": "softmax"}}, (2, 3, 6, 5), (2, 3, 24, 20)),
    ("sr_involution", {"channels": 16}, (2, 3, 6, 5), (2, 3, 12, 10)),
    ("edsr_baseline", {"channels": 8, "num_blocks": 2}, (2, 3, 6, 5), (2, 3, 12, 10)),
    ("edsr_baseline", {"channels": 8, "num_blocks": 1, "scale": 3}, (1, 3, 6, 5), (1, 3, 18, 15)),
    ("edsr_baseline", {"channels": 8, "num_blocks": 1, "scale": 4}, (1, 3, 6, 5), (1, 3, 24, 20)),
    ("rrdb", {"channels": 8, "growth_channels": 4, "num_blocks": 1}, (2, 3, 6, 5), (2, 3, 24, 20)),
    ("rrdb", {"channels": 8, "growth_channels": 4, "num_blocks": 1, "scale": 2}, (1, 3, 6, 4), (1, 3, 12, 8)),
    ("rrdb", {"channels": 8, "growth_channels": 4, "num_blocks": 1, "scale": 3}, (1, 3, 6, 5), (1, 3, 18, 15)),
    ("vqvae", {"hidden_channels": 8, "residual_channels": 4, "embedding_dim": 4, "num_embeddings": 16}, (2, 3, 8, 12), (2, 3, 8, 12)),
    ("vqvae", {"hidden_channels": 8, "residual_channels": 4, "embedding_dim": 4, "num_embeddings": 16, "upsample": "nearest"},
     (2, 3, 8, 12), (2, 3, 8, 12)),
    ("vqvae", {"hidden_channels": 8, "residual_channels": 4, "embedding_dim": 4, "num_embeddings": 16,
               "upsample": "pixel_shuffle"}, (2, 3, 8, 12), (2, 3, 8, 12)),
]


def _ids(case):
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items() if k not in ('layer',))}"


# -- registry ---------------------------------------------------------------------------------
def test_registry_names_and_tasks():
    assert set(NAMES) <= set(MODELS)
    assert model_task("resnet18_cifar") == "classification"
    assert {model_task(n) for n in NAMES if n.startswith(("sr_", "edsr", "rrdb"))} == {"super_resolution"}
    assert model_task("vqvae") == "reconstruction"
    assert model_options("rrdb") == {"scale": 4, "channels": 64, "num_blocks": 23, "growth_channels": 32}


def test_unknown_model_and_options_are_named():
    with pytest.raises(ValueError, match=r"model must be one of .*'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match=r"'sr_plain'.*\['chanels'\].*accepted options: \['channels', 'num_layers', 'scale'\]"):
        build_model("sr_plain", chanels=8)
    with pytest.raises(ValueError, match=r"'sr_switched'.*switched layer option.*\['num_experts'\].*breadth"):
        build_model("sr_switched", channels=8, layer={"num_experts": 2})
    with pytest.raises(ValueError, match=r"'resnet18_cifar'.*layer kind must be one of.*'dense'"):
        build_model("resnet18_cifar", block_conv2="dense")
    with pytest.raises(ValueError, match=r"'edsr_baseline'.*scale must be one of \(2, 3, 4\), got 5"):
        build_model("edsr_baseline", scale=5)
    with pytest.raises(ValueError, match="num_layers must be >= 2"):
        build_model("sr_plain", num_layers=1)
    with pytest.raises(ValueError, match="already registered"):
        dynconv.models.register_model("sr_plain", task="super_resolution")(lambda: nn.Identity())


# -- shapes and gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("case", TINY, ids=_ids)
def test_output_shape_and_backward(case):
    name, options, in_shape, out_shape = case
    torch.manual_seed(0)
    model = build_model(name, **options).train()
    x = torch.rand(in_shape)
    out = model(x)
    if name == "vqvae":
        assert set(out) >= {"reconstruction", "commitment_loss", "codes", "perplexity"}
        assert out["codes"].shape == (in_shape[0], in_shape[2] // 4, in_shape[3] // 4)
        loss = F.mse_loss(out["reconstruction"], x) + out["commitment_loss"]
        out = out["reconstruction"]
    else:
        loss = out.square().mean()
    assert tuple(out.shape) == out_shape
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the first layer learns (for the VQ-VAE: only through the straight-through estimator)
    first = next(p for p in model.parameters())
    assert first.grad.abs().sum() > 0


def test_resnet_block_conv2_kinds():
    expected = {"conv": nn.Conv2d, "switched": SwitchedConv2d, "condconv": CondConv2d, "involution": Involution2d}
    for kind, cls in expected.items():
        model = build_model("resnet18_cifar", width=16, block_conv2=kind)
        blocks = model.checkpoint_blocks()
        assert len(blocks) == 8
        assert all(type(b.conv2) is cls for b in blocks)
        assert all(type(b.conv1) is nn.Conv2d for b in blocks)  # only conv2 is replaced
    inv = build_model("resnet18_cifar", width=16, block_conv2="involution", layer={"groups": 2})
    assert inv.layer1[0].conv2.kernel_size == 3 and inv.layer1[0].conv2.groups == 2
    switched = build_model("resnet18_cifar", width=4, block_conv2="switched", layer={"breadth": 4, "selector": "lambda"})
    assert switched.layer4[1].conv2.breadth == 4 and isinstance(switched.layer4[1].conv2.selector, LambdaSelector)


def test_reference_model_sizes():
    """Parameter counts of the published models: the architectures are the reference ones."""
    size = lambda name, **o: sum(p.numel() for p in build_model(name, **o).parameters())  # noqa: E731
    assert size("resnet18_cifar") == 11_173_962
    assert size("edsr_baseline", scale=2) == 1_369_859
    assert size("rrdb") == 16_697_987  # ESRGAN's RRDB_ESRGAN_x4


def test_resnet_block_conv2_stages_limit_the_swap():
    """layer1-2 only (the switched-conv author's high-resolution setting): stages 3-4 keep convs."""
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", width=4, block_conv2="switched", layer={"breadth": 2}, block_conv2_stages=[2, 1])
    assert model.block_conv2_stages == (1, 2)
    for stage, expected in ((model.layer1, SwitchedConv2d), (model.layer2, SwitchedConv2d), (model.layer3, nn.Conv2d),
                            (model.layer4, nn.Conv2d)):
        assert [type(block.conv2) for block in stage] == [expected, expected]
    model(torch.rand(2, 3, 16, 16)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    for bad in ([], [0], [1, 5], [1, 1], "12", [True], None):
        with pytest.raises(ValueError, match=r"block_conv2_stages must be a non-empty list of stage numbers .* got"):
            build_model("resnet18_cifar", width=4, block_conv2_stages=bad)


def test_resnet_sizes_match_the_comparison_report():
    """The report replaced the second conv of every block: conv 11.2M, involution (3x3) 5.1M,
    CondConv (4 experts) 30.0M parameters; ours at width 64: 11.2M, 5.18M, 30.0M."""
    size = lambda **o: sum(p.numel() for p in build_model("resnet18_cifar", **o).parameters())  # noqa: E731
    with torch.device("meta"):
        assert round(size() / 1e6, 1) == 11.2
        assert round(size(block_conv2="involution", layer={"kernel_size": 3}) / 1e6, 1) == 5.2  # 5,181,122: report 5.1M
        assert round(size(block_conv2="condconv", layer={"num_experts": 4}) / 1e6, 1) == 30.0
        # switched b=8 stores 8 kernels per conv2; only in layer1-2 it adds 7 x (64^2 + 128^2) x 9 x 2 + selectors
        assert size(block_conv2="switched", layer={"breadth": 8}, block_conv2_stages=[1, 2]) == 13_757_546


def test_checkpoint_blocks_recompute_the_same():
    torch.manual_seed(0)
    model = build_model("sr_plain", channels=8)
    x = torch.rand(1, 3, 6, 6)
    reference = model(x)
    reference.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for block in model.checkpoint_blocks():
        forward = block.forward
        block.forward = lambda t, _f=forward: checkpoint(_f, t, use_reentrant=False)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, reference)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)
    for name, opts in [("edsr_baseline", {"num_blocks": 3}), ("rrdb", {"num_blocks": 2, "channels": 8}), ("vqvae", {})]:
        blocks = build_model(name, **opts).checkpoint_blocks()
        assert len(blocks) in (2, 3, 4) and all(isinstance(b, nn.Module) for b in blocks)


# -- conversion -------------------------------------------------------------------------------
def _warm_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def test_resnet_convert_to_switched_keeps_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", width=8)
    x = torch.randn(2, 3, 16, 16)
    _warm_batchnorm(model, x)
    with torch.no_grad():
        before = model(x)
    names = dynconv.convert(model, to="switched", breadth=4)
    assert len(names) == 20 and not names.skipped  # stem, 16 block convs, 3 shortcut projections
    model.eval()
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_vqvae_convert_to_switched_keeps_outputs():
    torch.manual_seed(0)
    model = build_model("vqvae", hidden_channels=16, residual_channels=8, embedding_dim=8, num_embeddings=32).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    names = dynconv.convert(model, to="switched", breadth=2)
    assert "encoder.conv1" in names and "decoder.conv1" in names and not names.skipped
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after["codes"], before["codes"])
    torch.testing.assert_close(after["reconstruction"], before["reconstruction"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upsample", ["nearest", "pixel_shuffle"])
@pytest.mark.parametrize("to,options", [("switched", {"breadth": 8, "selector": "lambda_then_conv1x1"}),
                                        ("switched", {"breadth": 16, "selector": "conv1x1", "selector_dropout": 0.25}),
                                        ("condconv", {"num_experts": 4})])
def test_vqvae_4_plus_4_convs_convert_and_keep_outputs(upsample, to, options):
    """INCLUDE_4_PLUS_4 picks exactly 4 encoder and 4 decoder convs, the decoder's output conv
    at full resolution among them; converting them keeps codes and reconstruction."""
    from dynconv.models.vqvae import INCLUDE_4_PLUS_4

    torch.manual_seed(0)
    hidden = 32 if upsample == "pixel_shuffle" else 16  # the lambda's 4 heads divide hidden / 8 channels
    model = build_model("vqvae", hidden_channels=hidden, residual_channels=8, embedding_dim=8, num_embeddings=32,
                        upsample=upsample).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    top = model.decoder.upsample2.conv
    assert top.out_channels == 3  # the conv that writes the image, at the output resolution
    names = dynconv.convert(model, to=to, include=list(INCLUDE_4_PLUS_4), **options)
    assert not names.skipped and len(names) == 8
    assert sum(n.startswith("encoder.") for n in names) == 4 and sum(n.startswith("decoder.") for n in names) == 4
    assert "decoder.upsample2.conv" in names and "encoder.conv1" not in names and "decoder.conv1" not in names
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after["codes"], before["codes"])
    torch.testing.assert_close(after["reconstruction"], before["reconstruction"], rtol=1e-5, atol=1e-5)


def test_vqvae_upsample_default_keeps_the_transposed_layout():
    """Configs and checkpoints from before the option: the default is Sonnet's transposed convs
    (same state-dict keys and shapes, so old weights load); bad values are named."""
    options = dict(hidden_channels=8, residual_channels=4, embedding_dim=4, num_embeddings=16)
    default = build_model("vqvae", **options)
    keys = set(default.state_dict())
    assert {"decoder.deconv1.weight", "decoder.deconv2.weight"} <= keys
    assert not any("upsample" in k for k in keys)
    build_model("vqvae", upsample="transposed", **options).load_state_dict(default.state_dict())
    nearest = build_model("vqvae", upsample="nearest", **options)
    assert {"decoder.upsample1.conv.weight", "decoder.upsample2.conv.weight"} <= set(nearest.state_dict())
    assert not any("deconv" in k for k in nearest.state_dict())
    with pytest.raises(ValueError, match=r"upsample must be one of \('transposed', 'nearest', 'pixel_shuffle'\), got 'bilinear'"):
        build_model("vqvae", upsample="bilinear", **options)
    with pytest.raises(ValueError, match="hidden_channels divisible by 8.*got 12"):
        build_model("vqvae", upsample="pixel_shuffle", **{**options, "hidden_channels": 12})


def test_sr_plain_convert_to_condconv_keeps_outputs():
    torch.manual_seed(0)
    model = build_model("sr_plain", channels=8).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    assert dynconv.convert(model, to="condconv", include="body.*.conv", num_experts=3) == [
        "body.0.conv", "body.1.conv", "body.2.conv"
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# -- VQ-VAE codebook --------------------------------------------------------------------------
def test_ema_codebook_updates_only_in_training():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(8, 3)
    z = torch.randn(2, 3, 4, 4)
    buffers = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    out = vq(z)
    assert all(torch.equal(v, buffers[k]) for k, v in vq.state_dict().items())

    vq.train()
    codebook = vq.embedding.clone()
    out_train = vq(z)
    assert torch.equal(out_train["codes"], out["codes"])  # quantised with the pre-update codebook
    assert int(vq.ema_steps) == 1 and not torch.equal(vq.embedding, codebook)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = out["codes"].flatten()
    counts = torch.bincount(codes, minlength=8).float()
    # step 1 with zero-debiasing: each used code moves to the mean of its vectors (Laplace
    # smoothing changes that by ~eps); unused codes become 0 (as in Sonnet)
    n = counts.sum()
    smoothed = (counts + 1e-5) / (n + 8 * 1e-5) * n
    expected = torch.zeros(8, 3).index_add_(0, codes, flat) / smoothed[:, None]
    torch.testing.assert_close(vq.embedding, expected, rtol=1e-5, atol=1e-6)
    # step 2: EMA of counts and sums, debiased by 1 - decay^2
    out2 = vq(z + 0.1)
    codes2 = out2["codes"].flatten()
    c2 = torch.bincount(codes2, minlength=8).float()
    s2 = torch.zeros(8, 3).index_add_(0, codes2, (z + 0.1).permute(0, 2, 3, 1).reshape(-1, 3))
    hidden_c = 0.01 * 0.99 * counts + 0.01 * c2
    hidden_s = 0.01 * 0.99 * torch.zeros(8, 3).index_add_(0, codes, flat) + 0.01 * s2
    debias = 1 - 0.99**2
    size = hidden_c / debias
    size = (size + 1e-5) / (size.sum() + 8e-5) * size.sum()
    torch.testing.assert_close(vq.embedding, hidden_s / debias / size[:, None], rtol=1e-4, atol=1e-5)


def test_vq_losses_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(16, 4, commitment_cost=0.25).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    e = vq.embedding[out["codes"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(out["commitment_loss"], 0.25 * F.mse_loss(z, e))
    torch.testing.assert_close(out["quantized"], e)
    out["quantized"].sum().backward()  # straight-through: identity gradient to z
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    assert 1.0 <= float(out["perplexity"]) <= 16.0
    assert out["codes"].dtype == torch.int64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # codes and losses stay in fp32 under AMP
        amp = vq(z.detach().to(torch.bfloat16))
    assert amp["quantized"].dtype == amp["commitment_loss"].dtype == torch.float32


def test_vqvae_rejects_sizes_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("vqvae", hidden_channels=8, residual_channels=4, embedding_dim=4)(torch.rand(1, 3, 10, 12))


# -- matched FLOPs ----------------------------------------------------------------------------
def test_match_flops_within_ten_percent():
    target = flops_per_pixel(build_model("sr_plain", channels=16), (1, 3, 16, 16))
    for name, options in [
        ("sr_plain", {}),
        ("sr_switched", {"layer": {"breadth": 8}}),
        ("sr_condconv", {"layer": {"num_experts": 4}}),
        ("sr_involution", {}),
    ]:
        result = match_flops(name, target, 2, lr_size=16, **options)
        assert abs(result["relative_error"]) < 0.10, (name, result)
        model = build_model(name, channels=result["channels"], **options)
        assert flops_per_pixel(model, (1, 3, 16, 16)) == pytest.approx(result["flops_per_pixel"])
    assert match_flops("sr_plain", target, 2, lr_size=16, multiple=1)["channels"] == 16
    with pytest.raises(ValueError, match="super-resolution"):
        match_flops("vqvae", target)


def test_rrdb_x2_accepts_odd_lr_sizes():
    from dynconv.models import build_model

    model = build_model("rrdb", scale=2, channels=8, num_blocks=1, growth_channels=4)
    for h, w in ((7, 9), (8, 10), (5, 6)):
        assert model(torch.rand(1, 3, h, w)).shape == (1, 3, 2 * h, 2 * w)


def test_sr_switched_layers_with_three_selector_channels_route_by_the_lr_image():
    import dynconv
    from dynconv.models import build_model

    torch.manual_seed(0)
    model = build_model("sr_plain", channels=8, num_layers=4)
    lr = torch.rand(2, 3, 10, 10)
    before = model(lr)
    dynconv.convert(model, to="switched", include=["body.*.conv"], breadth=4, selector_channels=3)
    assert torch.allclose(model(lr), before, atol=1e-5)  # copies of the kernel: output unchanged
    seen = []
    layer = model.body[0].conv
    layer.selector.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(lr)
    assert seen and seen[0].shape[1] == 3
    assert torch.allclose(seen[0], lr - 0.5)  # the centred LR image, not the layer's input
