"""The demo job end to end in --quick mode: PNGs, summary.json, weights, finite PSNRs."""

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("skimage")

from dynconv import demo  # noqa: E402


def test_quick_demo_writes_maps_summary_and_weights(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo.main(["--quick", "--out", str(out)])

    maps = sorted((out / "selector_maps").glob("*.png"))
    assert len(maps) == 6  # 3 switched layers x (one held-out image + a usage chart)
    assert all(p.stat().st_size > 1000 for p in maps)
    assert (out / "comparison.png").is_file()

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["table"] == summary["table"]
    assert [r["model"] for r in on_disk["table"]] == ["plain", "switched", demo.EQUAL_STEPS]
    for row in on_disk["table"]:
        assert row["train_steps"] >= 1
        for key in ("psnr_y", "psnr_rgb", "bicubic_psnr_y", "bicubic_psnr_rgb"):
            assert math.isfinite(row[key]), (row["model"], key)
    assert on_disk["table"][2]["train_steps"] == on_disk["table"][1]["train_steps"]
    assert set(on_disk["routing"]) == {"body.0", "body.1", "body.2"}
    for layer in on_disk["routing"].values():
        assert len(layer["train_recent_usage"]) == 8
        assert 0.0 <= layer["train_recent_entropy"] <= 1.0 + 1e-9
        assert math.isclose(sum(layer["heldout_astronaut_usage"]), 1.0, abs_tol=1e-3)

    state = torch.load(out / "switched.pt", weights_only=True)
    model = demo.SRNet(switched=True)
    model.load_state_dict(state)  # the SwitchNorm buffers travel with the weights
    assert "PSNR-Y" in capsys.readouterr().out


def test_training_is_reproducible_for_a_fixed_seed():
    images = [demo.load_photo("chelsea.png")]

    def trained(seed):
        torch.manual_seed(seed)
        model = demo.SRNet(switched=True)
        trainer = demo.Trainer(model, demo.CropSampler(images, 16, 2, seed=seed), lr=2e-3,
                               seconds=math.inf, max_steps=3)
        assert demo.train_interleaved([trainer])[0].steps == 3
        return model.state_dict()

    a, b = trained(0), trained(0)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "example: python -m dynconv.demo" in capsys.readouterr().out
