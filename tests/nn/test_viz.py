"""dynconv.viz.save_selector_maps writes real PNGs: image beside map, usage chart per layer."""

import pytest
import torch
from torch import nn

import dynconv

pytest.importorskip("matplotlib")


def test_save_selector_maps(tmp_path):
    from dynconv.viz import save_selector_maps

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    dynconv.convert(model, breadth=4)
    images = torch.rand(2, 3, 16, 16)
    paths = save_selector_maps(model, images, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["0_image0.png", "0_image1.png", "0_usage.png", "2_image0.png", "2_image1.png", "2_usage.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(ValueError, match="images must be a 4-D tensor"):
        save_selector_maps(model, torch.rand(3, 16, 16), tmp_path)
