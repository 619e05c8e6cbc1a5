"""The ``dynconv`` command line: help with examples, train / resume / eval / convert / viz / info
on a tiny SR run, config errors as exit status 2, the demo passthrough, ``python -m dynconv``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from dynconv import cli
from dynconv.models import flops
from dynconv.train import checkpoint as ckpt

from helpers import sr_config, write_config  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["convert"], ["viz"], ["info"]])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(command + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: dynconv" in out and "examples:" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert "commands:" in capsys.readouterr().out


def test_demo_passes_its_arguments(monkeypatch):
    import dynconv.demo

    seen = []
    monkeypatch.setattr(dynconv.demo, "main", lambda argv=None: seen.append(argv))
    assert cli.main(["demo", "--quick", "--out", "x"]) == 0
    assert seen == [["--quick", "--out", "x"]]


def test_config_errors_exit_2_with_key_path(tmp_path, sr_root, capsys):
    raw = sr_config(sr_root)
    raw["train"]["bacth_size"] = 3
    assert cli.main(["train", str(write_config(tmp_path / "bad.yaml", raw))]) == cli.EXIT_USAGE
    assert "config error: train.bacth_size: unknown key" in capsys.readouterr().err
    good = write_config(tmp_path / "good.yaml", sr_config(sr_root))
    assert cli.main(["train", str(good), "--set", "model.name=resnet19"]) == cli.EXIT_USAGE
    assert "model.name: unknown model 'resnet19'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_train_resume_eval_convert_viz(tmp_path, sr_root, capsys):
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    train={"steps": 4}, eval={"every": 2})
    config = write_config(tmp_path / "plain.yaml", raw)
    run = tmp_path / "plain"
    # train half, refuse to overwrite, resume to the end
    assert cli.main(["train", str(config), "--run-dir", str(run), "--max-steps", "2"]) == 0
    assert cli.main(["train", str(config), "--run-dir", str(run)]) == cli.EXIT_USAGE
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step_00000004"
    # eval prints and writes metrics.json
    assert cli.main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "psnr_y" in out and json.loads((run / "metrics.json").read_text())["metrics"]["psnr_y"] > 0
    scored = json.loads((run / "metrics.json").read_text())
    assert f"model: {scored['params']:,} params" in out and "per HR output pixel (input 3x6x6)" in out
    # convert: same outputs, the new checkpoint rebuilds the switched model
    converted = tmp_path / "converted"
    assert cli.main(["convert", str(run), "--to", "switched", "--include", "body.*", "--breadth", "3",
                     "--selector", "lambda", "-o", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "converted 1 conv(s)" in out and "max |output difference|" in out
    meta = ckpt.read_meta(converted)
    assert meta["conversions"][0]["converted"] == ["body.0.conv"] and meta["max_output_difference"] < 1e-5
    from dynconv.train import load_checkpoint_model

    model, _, _ = load_checkpoint_model(converted)
    assert type(model.body[0].conv).__name__ == "SwitchedConv2d"
    plain, _, _ = load_checkpoint_model(run)
    x = torch.rand(1, 3, 10, 10)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-5)
    assert cli.main(["eval", str(converted)]) == 0
    # info on the converted checkpoint: its conversion applied, numbers as dynconv.models.flops counts them
    capsys.readouterr()
    assert cli.main(["info", str(converted), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["conversions"] == 1 and info["input_size"] == [3, 6, 6]
    assert info["params"] == flops.count_parameters(model) > scored["params"]
    assert info["flops_per_pixel"] == pytest.approx(flops.flops_per_pixel(model, (3, 6, 6)))
    assert "1 conversion(s) applied" in capsys.readouterr().out
    # stage 2: train on from the converted checkpoint
    stage2 = tmp_path / "stage2"
    assert cli.main(["train", str(config), "--set", f"model.init={converted}", "--set", "train.steps=1",
                     "--run-dir", str(stage2)]) == 0
    assert ckpt.read_meta(ckpt.latest_checkpoint(stage2 / "checkpoints"))["conversions"][0]["to"] == "switched"
    # viz: selector maps and usage charts
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (12, 10), (200, 30, 60)).save(image)
    assert cli.main(["viz", str(stage2), str(image), "-o", str(tmp_path / "maps")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "maps" / "photo").iterdir())
    assert pngs == ["body_0_conv_image0.png", "body_0_conv_usage.png"]
    assert "body.0.conv" in json.loads((tmp_path / "maps" / "routing.json").read_text())["layers"]
    # viz of a model without switched convs fails cleanly
    assert cli.main(["viz", str(run), str(image), "-o", str(tmp_path / "none")]) == cli.EXIT_ERROR


def test_info_of_a_config(tmp_path, sr_root, capsys):
    """Params and FLOPs per HR output pixel of a config's model, the per-layer table, --input-size,
    --set, --json; a bad size or source fails naming what was expected."""
    from dynconv.config import load_config
    from dynconv.train.experiment import build_experiment_model

    config = write_config(tmp_path / "sw.yaml", sr_config(sr_root))
    model = build_experiment_model(load_config(config))
    assert cli.main(["info", str(config), "--by-layer", "--json", str(tmp_path / "info.json")]) == 0
    out = capsys.readouterr().out
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["params"] == flops.count_parameters(model) and f"{info['params']:,}" in out
    # default: the LR training patch (patch_size 12 / scale 2)
    summary = flops.model_summary(model, (3, 6, 6))
    assert info["flops_per_pixel"] == pytest.approx(summary["flops_per_pixel"]) and info["input_size"] == [3, 6, 6]
    assert "per HR output pixel" in out and "patch_size 12 / scale 2" in out
    assert info["by_layer"].keys() == summary["by_layer"].keys()
    assert "body.0.conv" in out and "SwitchedConv2d" in out and "share" in out
    assert cli.main(["info", str(config), "--input-size", "10", "8", "--set", "model.options.channels=8",
                     "--json", str(tmp_path / "big.json")]) == 0
    big = json.loads((tmp_path / "big.json").read_text())
    wider = build_experiment_model(load_config(config, ["model.options.channels=8"]))
    assert big["flops_per_pixel"] == pytest.approx(flops.flops_per_pixel(wider, (3, 10, 8)))
    assert big["params"] == flops.count_parameters(wider) > info["params"]
    capsys.readouterr()
    assert cli.main(["info", str(config), "--input-size", "0", "8"]) == cli.EXIT_USAGE
    assert "expects two positive integers H W, got [0, 8]" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "missing")]) == cli.EXIT_ERROR
    assert "expected a YAML config, a run directory or a checkpoint directory" in capsys.readouterr().err


def test_python_dash_m_dynconv():
    proc = subprocess.run([sys.executable, "-m", "dynconv", "convert", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--include" in proc.stdout


def test_viz_normalises_images_as_the_run_trained_on_them():
    """``viz`` feeds the model what its data set fed it: ``data.options`` mean / std, else the
    data set's defaults (a VQ-VAE trained on [-0.5, 0.5] must not see [0, 1] images)."""
    from dynconv.config import config_from_dict
    from dynconv.data.classification import CIFAR10_MEAN
    from dynconv.train.experiment import input_normalisation

    def normalisation(data):
        config = config_from_dict({"model": {"name": "vqvae"}, "data": data, "train": {"steps": 1},
                                   "losses": [{"name": "mse"}]})
        return input_normalisation(config)

    mean, std = normalisation({"name": "image_folder", "root": "x", "options": {"mean": [0.5] * 3, "std": [1.0] * 3}})
    assert mean.flatten().tolist() == [0.5] * 3 and std.flatten().tolist() == [1.0] * 3 and mean.shape == (3, 1, 1)
    mean, _ = normalisation({"name": "image_folder", "root": "x"})
    assert mean.flatten().tolist() == pytest.approx(list(CIFAR10_MEAN))
    mean, std = normalisation({"name": "folder_crops", "root": "x"})
    assert mean.flatten().tolist() == [0.0] * 3 and std.flatten().tolist() == [1.0] * 3
