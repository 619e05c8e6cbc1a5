"""Metrics against known values and scikit-image; losses, including translational consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv.losses import LOSSES, TranslationalConsistencyLoss, build_loss
from dynconv.metrics import accuracy, psnr, psnr_y, reconstruction_mse, rgb_to_y, ssim, ssim_y

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_color = pytest.importorskip("skimage.color")


def _gray(level: int, shape=(1, 3, 16, 16)) -> torch.Tensor:
    return torch.full(shape, level / 255.0, dtype=torch.float64)


# -- rgb_to_y ---------------------------------------------------------------------------------
def test_rgb_to_y_known_values() -> None:
    colours = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    y = rgb_to_y(colours.view(5, 3, 1, 1)).flatten() * 255
    expected = torch.tensor([16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], dtype=torch.float64)
    torch.testing.assert_close(y, expected, atol=1e-9, rtol=0)


def test_rgb_to_y_matches_skimage_rgb2ycbcr() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((12, 9, 3))
    ref = skimage_color.rgb2ycbcr(img)[..., 0]  # MATLAB's rgb2ycbcr: Y in [16, 235]
    ours = rgb_to_y(torch.from_numpy(img).permute(2, 0, 1))[0].numpy() * 255
    np.testing.assert_allclose(ours, ref, atol=1e-9)


# -- PSNR -------------------------------------------------------------------------------------
def test_psnr_known_values() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.isinf(psnr(x, x)).all()


def test_psnr_y_known_value() -> None:
    # grey 100 vs grey 110: Y differs by 10 * (65.481 + 128.553 + 24.966) / 255 = 10 * 219 / 255
    value = psnr_y(_gray(110), _gray(100), shave=2)
    expected = 20 * math.log10(255 / (10 * 219 / 255))
    assert value.shape == (1,) and value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, abs=1e-9)


def test_psnr_y_shaves_the_border() -> None:
    hr = _gray(100, (2, 3, 20, 20))
    sr = hr.clone()
    sr[..., :3, :] = 1.0  # damage only the top 3 rows
    assert torch.isinf(psnr_y(sr, hr, shave=3)).all()
    assert torch.isfinite(psnr_y(sr, hr, shave=2)).all()


def test_psnr_y_quantises_and_clamps() -> None:
    hr = _gray(100)
    assert torch.isinf(psnr_y(hr + 0.4 / 255, hr, shave=0))  # rounds to the same 8-bit level
    assert torch.isfinite(psnr_y(hr + 0.4 / 255, hr, shave=0, quantize=False))
    assert psnr_y(torch.full_like(hr, 2.0), torch.ones_like(hr), shave=0).isinf()  # clamped to 1


def test_psnr_y_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr_y(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), 2)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        psnr_y(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="shave"):
        psnr_y(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 4)


# -- SSIM -------------------------------------------------------------------------------------
def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        skimage_metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    )


def test_ssim_matches_skimage_on_noise() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 37, 51, generator=g, dtype=torch.float64) * 255
    b = (a + 25 * torch.randn(3, 37, 51, generator=g, dtype=torch.float64)).clamp(0, 255)
    ours = ssim(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(_skimage_ssim(a[i].numpy(), b[i].numpy()), abs=1e-10)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_y_matches_skimage_on_a_photo() -> None:
    from dynconv.data import bicubic_resize, load_skimage_photo

    hr = load_skimage_photo("astronaut")[None, :, 100:228, 150:278]  # a 128x128 crop
    sr = bicubic_resize(bicubic_resize(hr, 0.5), 2.0).clamp(0, 1)
    shave = 2

    def y_numpy(img: torch.Tensor) -> np.ndarray:
        rgb = (img[0].permute(1, 2, 0).double().numpy() * 255).round() / 255
        return skimage_color.rgb2ycbcr(rgb)[shave:-shave, shave:-shave, 0]

    expected = _skimage_ssim(y_numpy(sr), y_numpy(hr))
    assert ssim_y(sr, hr, shave).item() == pytest.approx(expected, abs=1e-8)
    assert 0.5 < expected < 1.0
    mse = np.mean((y_numpy(sr) - y_numpy(hr)) ** 2)
    assert psnr_y(sr, hr, shave).item() == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)


def test_ssim_rejects_small_images() -> None:
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 10, 30), torch.zeros(1, 10, 30))


# -- accuracy, reconstruction MSE ---------------------------------------------------------------
def test_accuracy_and_reconstruction_mse() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 2])
    assert accuracy(logits, labels).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, labels[:3])
    rec = torch.zeros(2, 3, 4, 4)
    img = torch.stack([torch.full((3, 4, 4), 0.5), torch.zeros(3, 4, 4)])
    torch.testing.assert_close(reconstruction_mse(rec, img), torch.tensor([0.25, 0.0]))


# -- losses -----------------------------------------------------------------------------------
def test_registry_names() -> None:
    assert {"cross_entropy", "l1", "mse", "vq_commitment", "translational_consistency"} <= set(LOSSES)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        build_loss("nope")


def test_cross_entropy_with_label_smoothing() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    loss = build_loss("cross_entropy", label_smoothing=0.1)({"logits": logits}, {"label": labels})
    logp = logits.log_softmax(dim=1)
    target = torch.full((2, 3), 0.1 / 3)
    target[0, 0] += 0.9
    target[1, 2] += 0.9
    assert loss.item() == pytest.approx(-(target * logp).sum(dim=1).mean().item(), abs=1e-6)
    with pytest.raises(KeyError, match="logits"):
        build_loss("cross_entropy")({"sr": logits}, {"label": labels})


def test_l1_mse_pick_the_image_pair() -> None:
    sr, hr = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert build_loss("l1")({"sr": sr}, {"hr": hr, "lr": hr}).item() == pytest.approx(0.5)
    assert build_loss("mse", weight=2.0)({"reconstruction": sr}, {"image": hr}).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        build_loss("l1")({"sr": sr}, {"hr": hr[..., :2]})
    with pytest.raises(KeyError, match="prediction"):
        build_loss("l1")({"logits": sr}, {"hr": hr})


def test_vq_commitment() -> None:
    value = torch.tensor(0.3, requires_grad=True)
    out = build_loss("vq_commitment", weight=0.5)({"commitment_loss": value}, {})
    assert out.item() == pytest.approx(0.15)
    out.backward()
    assert value.grad.item() == pytest.approx(0.5)


class _Recorder(nn.Module):
    """Nearest x2 upsampling (translation-equivariant, no border effects) + a record of the
    crops it saw."""

    def __init__(self, position_bias: float = 0.0) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.position_bias = position_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        out = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        if self.position_bias:
            out = out + self.position_bias * torch.arange(out.shape[-1], dtype=out.dtype)
        return out


def test_translational_consistency_zero_for_equivariant_model() -> None:
    batch = {"lr": torch.rand(2, 3, 16, 16)}
    loss_fn = build_loss("translational_consistency", start_step=0)
    assert loss_fn.needs_model
    for seed in range(8):
        model = _Recorder()
        value = loss_fn(model, batch, step=5, generator=torch.Generator().manual_seed(seed))
        assert value.item() == pytest.approx(0.0, abs=0)
        assert len(model.inputs) == 2 and model.inputs[0].shape == (2, 3, 12, 12)
        assert not torch.equal(model.inputs[0], model.inputs[1])  # two different corners


def test_translational_consistency_sees_position_dependence() -> None:
    batch = {"lr": torch.rand(1, 3, 16, 16)}
    loss_fn = TranslationalConsistencyLoss(start_step=0, shift=4)
    values = {
        round(loss_fn(_Recorder(position_bias=0.01), batch, 1, generator=torch.Generator().manual_seed(s)).item(), 6)
        for s in range(20)
    }
    # The output columns are offset by 2 * (ox1 - ox2) = +-8 between left and right corners
    # (0.08 L1); top/bottom pairs have the same columns (0).
    assert values == {0.0, 0.08}


def test_translational_consistency_gradients_and_start_step() -> None:
    conv = nn.Conv2d(3, 12, 3, padding=1)
    model = nn.Sequential(conv, nn.PixelShuffle(2))
    batch = {"lr": torch.rand(2, 3, 12, 12)}
    loss_fn = TranslationalConsistencyLoss(start_step=10, weight=2.0)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    before = loss_fn(model, batch, step=9)
    assert before.item() == 0.0 and not calls  # inactive: the model is not even run
    after = loss_fn(model, batch, step=10, generator=torch.Generator().manual_seed(0))
    assert after.item() > 0  # zero padding differs at the crops' borders
    after.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_translational_consistency_matches_explicit_computation() -> None:
    # Same corners (same generator), crops and common region (LR rows/cols 4..11 of 16,
    # x2 in output pixels) computed by hand.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))
    lr = torch.rand(1, 3, 16, 16)
    loss_fn = TranslationalConsistencyLoss(shift=4)
    g = torch.Generator().manual_seed(3)
    value = loss_fn(model, {"lr": lr}, 0, generator=g)
    g = torch.Generator().manual_seed(3)
    a = int(torch.randint(4, (1,), generator=g))
    b = (a + 1 + int(torch.randint(3, (1,), generator=g))) % 4
    outs = []
    for corner in (a, b):
        oy, ox = TranslationalConsistencyLoss.corners(4)[corner]
        out = model(lr[..., oy : oy + 12, ox : ox + 12])
        outs.append(out[..., (4 - oy) * 2 : (12 - oy) * 2, (4 - ox) * 2 : (12 - ox) * 2])
    assert value.item() == pytest.approx(F.l1_loss(outs[0], outs[1]).item(), abs=1e-7)


def test_translational_consistency_errors() -> None:
    with pytest.raises(ValueError, match="shift"):
        TranslationalConsistencyLoss(shift=8)(_Recorder(), {"lr": torch.rand(1, 3, 16, 16)}, 0)
    with pytest.raises(ValueError, match="start_step"):
        TranslationalConsistencyLoss(start_step=-1)
    with pytest.raises(ValueError, match="integer multiple"):
        TranslationalConsistencyLoss()(lambda x: x[..., :-1, :-1], {"lr": torch.rand(1, 3, 16, 16)}, 0)
    with pytest.raises(KeyError, match="lr"):
        TranslationalConsistencyLoss()(_Recorder(), {"hr": torch.rand(1, 3, 16, 16)}, 0)
