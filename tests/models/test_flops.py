"""FLOPs per output pixel (2 x multiply-adds / output pixels) and parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynconv import CondConv2d, Involution2d, SwitchedConv2d
from dynconv.models import build_model
from dynconv.models.flops import count_parameters, flops_per_pixel, model_summary
from dynconv.nn.selectors import LambdaLayer


def test_single_conv_exact():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert flops_per_pixel(conv, (1, 3, 10, 10)) == 2 * 8 * 3 * 9
    # per output pixel: a stride-2 conv costs the same per pixel it produces
    assert flops_per_pixel(nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 10, 10)) == 2 * 8 * 3 * 9
    # grouped: in/groups inputs per output value; batch size does not change a per-pixel cost
    assert flops_per_pixel(nn.Conv2d(8, 8, 3, padding=1, groups=4), (2, 8, 6, 6)) == 2 * 8 * 2 * 9


def test_tiny_networks_by_hand():
    classifier = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    macs = 4 * 3 * 9 * 64 + 4 * 5  # conv on 8x8, then the linear layer once
    assert flops_per_pixel(classifier, (1, 3, 8, 8)) == 2 * macs / 64  # classifier: per input pixel

    decoder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1))
    macs = 4 * 3 * 64 + (4 * 64) * 2 * 16  # 1x1 conv on 8x8; each input value spreads to 2*4*4 outputs
    assert flops_per_pixel(decoder, (1, 3, 8, 8)) == 2 * macs / (16 * 16)


def test_sr_plain_counts_per_hr_pixel():
    model = build_model("sr_plain", scale=2, channels=16, num_layers=4)
    per_lr_pixel = 3 * 16 * 9 + 2 * 16 * 16 * 9 + 16 * 12 * 9
    assert flops_per_pixel(model, (1, 3, 8, 8)) == pytest.approx(2 * per_lr_pixel / 4, rel=1e-12)


def test_switched_counts_one_expert_plus_selector():
    conv = 2 * 8 * 8 * 9
    shape = (1, 8, 6, 6)
    b8 = flops_per_pixel(SwitchedConv2d(8, 8, 3, padding=1, breadth=8), shape)
    b2 = flops_per_pixel(SwitchedConv2d(8, 8, 3, padding=1, breadth=2), shape)
    assert b8 == conv + 2 * 8 * 8  # one expert + the 1x1 selector (8 -> 8 logits)
    assert b8 - b2 == 2 * 8 * (8 - 2)  # breadth changes only the selector's cost
    assert flops_per_pixel(SwitchedConv2d(8, 8, 3, padding=1, breadth=1), shape) == conv
    soft = flops_per_pixel(SwitchedConv2d(8, 8, 3, padding=1, breadth=4, routing="soft"), shape)
    assert soft == 4 * (conv + 2 * 8) + 2 * 8 * 4  # every expert + the mix, + selector


def test_condconv_counts_one_conv_plus_routing_and_mixing():
    layer = CondConv2d(8, 4, 3, padding=1, num_experts=3)
    pixels = 6 * 6
    kernel = 4 * 8 * 9
    macs = kernel * pixels + 8 * 3 + 3 * (kernel + 4)  # conv + router + mixing (weights and bias)
    assert flops_per_pixel(layer, (1, 8, 6, 6)) == pytest.approx(2 * macs / pixels, rel=1e-12)


def test_involution_counts_generation_and_application():
    layer = Involution2d(16, kernel_size=3, groups=2, reduction=4)
    macs = 16 * 9 + 16 * 4 + 4 * 9 * 2  # application + reduce 1x1 (16->4) + span 1x1 (4->18)
    assert flops_per_pixel(layer, (1, 16, 5, 5)) == 2 * macs


def test_lambda_layer_counted():
    layer = LambdaLayer(16, heads=4, key_dim=8, context=3)
    value_dim = 4
    macs = (8 * 4 + 8 + 4) * 16  # to_q, to_k, to_v 1x1 convs
    macs += 8 * value_dim * 9  # positional Conv3d: one 3x3 per (key, value) output
    macs += 8 * value_dim * (1 + 2 * 4)  # content lambda, then q with content and positional lambdas
    summary = model_summary(layer, (1, 16, 5, 5))
    assert summary["flops_per_pixel"] == pytest.approx(2 * macs, rel=1e-12)


def test_custom_count_macs_and_vq_codebook():
    model = build_model("vqvae", hidden_channels=8, residual_channels=4, residual_layers=1, embedding_dim=4, num_embeddings=16)
    by_layer = model_summary(model, (1, 3, 8, 8))["by_layer"]
    assert by_layer["quantizer"]["flops_per_pixel"] == 2 * (2 * 2) * 16 * 4 / 64  # 2x2 latents x 16 codes x dim 4


def test_summary_by_layer_sums_to_total_and_leaves_state_alone():
    model = build_model("sr_switched", channels=8, num_layers=4, layer={"breadth": 4, "norm_buffer": 2})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = model_summary(model, (2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # eval while counting: no SwitchNorm/BN updates
    assert sum(v["flops_per_pixel"] for v in summary["by_layer"].values()) == pytest.approx(summary["flops_per_pixel"])
    assert summary["by_layer"]["body.0.conv"]["type"] == "SwitchedConv2d"
    assert summary["by_layer"]["body.0.conv"]["params"] == 4 * 8 * 8 * 9 + 8  # own params: experts + bias
    assert summary["params"] == count_parameters(model)


def test_count_parameters():
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, shared)) == 12
    assert count_parameters(SwitchedConv2d(4, 4, 3, breadth=3)) == 3 * 4 * 4 * 9 + 4 + (4 * 3 + 3)
    frozen = nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == 4


def test_bad_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        flops_per_pixel(nn.Conv2d(3, 3, 1), (3, 10))
    with pytest.raises(TypeError, match="model"):
        flops_per_pixel("not a model", (3, 4, 4))
