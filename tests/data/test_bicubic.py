"""MATLAB ``imresize`` (bicubic) compatibility of ``dynconv.data.bicubic_resize``.

Known values are derived by hand from MATLAB's algorithm (``imresize.m``, ``contributions``):
cubic kernel a = -0.5, widened by 1/scale when downscaling, indices mirrored ``[1:n, n:-1:1]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynconv.data import bicubic_resize
from dynconv.data.bicubic import cubic, resize_matrix, resize_weights

# imresize(x, 1/2): 8 taps 0.5 * cubic(0.5 * d), d = +-0.5, +-1.5, +-2.5, +-3.5 (sum to 1 exactly)
X2_DOWN = np.array([-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875])
# imresize(x, 2): 4 taps cubic(d), d = 1.75, 0.75, -0.25, -1.25 (even outputs; odd ones mirrored)
X2_UP = np.array([-0.0234375, 0.2265625, 0.8671875, -0.0703125])
# imresize(x, 1/3): u is an input pixel centre; taps (1/3) cubic(d/3), d = -5..5; d = +-3 are 0
X3_DOWN = np.array([-1 / 81, -2 / 81, 0, 1 / 9, 7 / 27, 1 / 3, 7 / 27, 1 / 9, 0, -2 / 81, -1 / 81])


def test_cubic_kernel_values() -> None:
    d = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, -1.5])
    expected = np.array([1.0, 0.8671875, 0.5625, 0.0, -0.0625, 0.0, 0.0, -0.0625])
    np.testing.assert_allclose(cubic(d), expected, atol=0)


def test_x2_down_weights_and_mirrored_indices() -> None:
    weights, indices = resize_weights(16, 8, 0.5)
    assert weights.shape == (8, 8)
    for row in range(8):
        np.testing.assert_allclose(weights[row], X2_DOWN, atol=1e-15)
    # output 1 (MATLAB 1-based): u = 1.5, inputs -2..5 -> mirrored 3 2 1 1 2 3 4 5 (0-based: 2 1 0 0 1 2 3 4)
    assert indices[0].tolist() == [2, 1, 0, 0, 1, 2, 3, 4]
    assert indices[3].tolist() == list(range(3, 11))
    assert indices[7].tolist() == [11, 12, 13, 14, 15, 15, 14, 13]


def test_x2_up_weights() -> None:
    weights, indices = resize_weights(8, 16, 2.0)
    assert weights.shape == (16, 4)
    np.testing.assert_allclose(weights[0], X2_UP, atol=1e-15)  # u = 0.75: inputs -1, 0, 1, 2
    np.testing.assert_allclose(weights[1], X2_UP[::-1], atol=1e-15)  # u = 1.25
    assert indices[0].tolist() == [1, 0, 0, 1]


def test_x3_down_weights_drop_all_zero_columns() -> None:
    weights, _ = resize_weights(30, 10, 1 / 3)
    nonzero = X3_DOWN[X3_DOWN != 0]
    assert weights.shape == (10, nonzero.size)  # MATLAB removes taps that are zero for every output
    for row in range(10):
        np.testing.assert_allclose(weights[row], nonzero, atol=1e-12)


def test_hand_computed_1d_ramp_x2_down() -> None:
    # imresize(1:8, 0.5) by hand: outputs sit at u = 1.5, 3.5, 5.5, 7.5; a ramp would give u,
    # but mirroring replaces inputs -2, -1, 0 by 3, 2, 1 (and 9, 10, 11 by 8, 7, 6):
    # 1.5 + 5 * (-0.01171875) + 3 * (-0.03515625) + 1 * 0.11328125 = 1.44921875;
    # 3.5 + (1 - 0) * (-0.01171875) = 3.48828125.
    signal = torch.arange(1, 9, dtype=torch.float64).view(1, 1, 1, 8)
    out = bicubic_resize(signal, 0.5)
    first = float(X2_DOWN @ np.array([3, 2, 1, 1, 2, 3, 4, 5], dtype=np.float64))
    assert first == 1.44921875
    expected = [1.44921875, 3.48828125, 5.51171875, 7.55078125]
    assert out.shape == (1, 1, 1, 4)
    np.testing.assert_allclose(out.flatten().numpy(), expected, atol=1e-12)


def test_matches_direct_sum_with_matlab_weights() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, generator=g, dtype=torch.float64)
    out = bicubic_resize(x.view(1, 1, 20), 0.5).flatten()
    padded = np.concatenate([x.numpy()[:4][::-1], x.numpy(), x.numpy()[-4:][::-1]])  # mirrored by 4
    # output k (0-based) sits at u = 2k + 1.5 (1-based) and reads inputs 2k-3 .. 2k+4 (0-based),
    # i.e. padded 2k+1 .. 2k+8
    expected = [X2_DOWN @ padded[2 * k + 1 : 2 * k + 9] for k in range(10)]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)
    up = bicubic_resize(x.view(1, 20, 1), 2.0)[0, :, 0]  # (1, 40, 2): both columns equal
    padded = np.concatenate([x.numpy()[:2][::-1], x.numpy(), x.numpy()[-2:][::-1]])
    expected_up = []
    for k in range(40):
        j = k // 2  # output 2j (0-based) uses inputs j-2..j+1 (X2_UP); output 2j+1 uses j-1..j+2 reversed
        expected_up.append(X2_UP @ padded[j : j + 4] if k % 2 == 0 else X2_UP[::-1] @ padded[j + 1 : j + 5])
    np.testing.assert_allclose(up.numpy(), expected_up, atol=1e-12)


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.25, 2.0, 3.0, 4.0])
def test_constant_image_stays_constant(scale: float) -> None:
    img = torch.full((2, 3, 24, 36), 0.37, dtype=torch.float64)
    out = bicubic_resize(img, scale)
    assert out.shape == (2, 3, math.ceil(24 * scale - 1e-9), math.ceil(36 * scale - 1e-9))
    torch.testing.assert_close(out, torch.full_like(out, 0.37), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_linear_ramp_gives_pixel_centres(scale: int) -> None:
    # Away from the borders the kernel is symmetric about u, so a ramp maps to the ramp at
    # u = x / s + (1 - 1 / s) / 2: for x2 downscaling, the midpoint of each input pair.
    n = 48
    ramp = torch.arange(1, n + 1, dtype=torch.float64).view(1, 1, 1, n).expand(1, 1, 12, n)
    down = bicubic_resize(ramp, 1 / scale)[0, 0, 0]
    x = torch.arange(1, n // scale + 1, dtype=torch.float64)
    u = x * scale + 0.5 * (1 - scale)
    m = 2 * scale
    torch.testing.assert_close(down[m:-m], u[m:-m], atol=1e-10, rtol=0)
    up = bicubic_resize(ramp, float(scale))[0, 0, 0]
    x = torch.arange(1, n * scale + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    m = 3 * scale
    torch.testing.assert_close(up[m:-m], u[m:-m], atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.25, 2.0, 3.0, 4.0])
def test_interior_matches_torch_antialiased_bicubic(scale: float) -> None:
    # PyTorch's antialiased bicubic uses the same kernel (a = -0.5, widened by 1/scale) but
    # truncates it at the borders instead of mirroring: the interiors must agree exactly.
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 48, 60, generator=g, dtype=torch.float64)
    out = bicubic_resize(img, scale)
    ref = F.interpolate(img, size=out.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    m = 3 * math.ceil(scale) if scale > 1 else 3  # output pixels that read a mirrored input
    torch.testing.assert_close(out[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-12, rtol=0)
    assert not torch.allclose(out, ref, atol=1e-6)  # the borders differ: MATLAB mirrors


def test_batch_dims_dtype_and_matrix() -> None:
    img = torch.rand(2, 4, 3, 12, 10)
    out = bicubic_resize(img, 0.5)
    assert out.shape == (2, 4, 3, 6, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 2], bicubic_resize(img[1, 2], 0.5))
    m = resize_matrix(12, 6, 0.5, dtype=torch.float64)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(6, dtype=torch.float64))
    assert bicubic_resize(img, 0.5, out_size=(6, 5)).shape == out.shape


def test_scale_one_is_identity() -> None:
    img = torch.rand(1, 3, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(bicubic_resize(img, 1.0), img, atol=1e-12, rtol=0)


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="floating"):
        bicubic_resize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="scale"):
        bicubic_resize(torch.zeros(1, 3, 8, 8), 0.0)
    with pytest.raises(ValueError, match="scale"):
        bicubic_resize(torch.zeros(1, 3, 8, 8), float("nan"))
