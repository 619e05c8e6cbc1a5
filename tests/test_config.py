"""Config validation: unknown keys, wrong types, bad values and unknown registry names fail
before training starts, naming the key path and what is expected; shipped configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynconv.config import ConfigError, config_from_dict, load_config, save_config
from dynconv.train import Trainer, check_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def base() -> dict:
    return {
        "model": {"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
        "data": {"name": "skimage_sr", "options": {"scale": 2}},
        "train": {"steps": 10, "batch_size": 2},
        "losses": [{"name": "l1"}],
    }


def with_(raw: dict, overrides: list[str]) -> dict:
    return config_from_dict(raw, overrides)


@pytest.mark.parametrize("overrides, path, expected", [
    (["train.bacth_size=3"], "train.bacth_size", "unknown key; expected one of"),
    (["optimizer.lr=0.1"], "optimizer", "unknown key"),
    (["train.batch_size=big"], "train.batch_size", "expected an integer, got str 'big'"),
    (["train.batch_size=0"], "train.batch_size", "expected a value >= 1, got 0"),
    (["train.precision=fp8"], "train.precision", "expected one of ['fp32', 'bf16', 'fp16']"),
    (["train.epochs=3"], "train.steps", "give exactly one of steps or epochs"),
    (["train.ema=1.5"], "train.ema", "expected a decay in (0, 1)"),
    (["optim.lr=-1"], "optim.lr", "expected a value > 0"),
    (["optim.betas=[0.9]"], "optim.betas", "expected a list of 2"),
    (["schedule.milestones=[5, 2]"], "schedule.milestones", "expected increasing steps"),
    (["losses=[]"], "losses", "expected at least one loss term"),
    (["eval.best_metric=psnr"], "eval.best_metric", "expected one of eval.metrics"),
    (["convert.breadth=4"], "convert.step", "required key is missing"),
    (["log.checkpoint_every=0"], "log.checkpoint_every", "expected a value >= 1"),
    (["data.on_bad_file=ignore"], "data.on_bad_file", "expected one of ['error', 'skip']"),
    (["model.options=3"], "model.options", "expected a mapping"),
])
def test_schema_errors_name_the_key_path(overrides, path, expected):
    with pytest.raises(ConfigError) as info:
        with_(base(), overrides)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_missing_section():
    raw = base()
    del raw["model"]
    with pytest.raises(ConfigError, match=r"^model: required key is missing"):
        config_from_dict(raw)


@pytest.mark.parametrize("overrides, path, expected", [
    (["model.name=resnet19"], "model.name", "unknown model 'resnet19'; expected one of ["),
    (["model.options.chanels=8"], "model.options.chanels", "unknown option of model 'sr_plain'"),
    (["data.name=imagenet"], "data.name", "unknown dataset 'imagenet'; expected one of ["),
    (["data.options.patch=8"], "data.options.patch", "unknown option of dataset 'skimage_sr'"),
    (["data.name=sr_folder"], "data.root", "needs a root"),
    (["data.device_cache=true"], "data.device_cache", "only for classification datasets"),
    (["losses=[{name: l3}]"], "losses[0].name", "unknown loss 'l3'; expected one of ["),
    (["losses=[{name: l1, options: {weight: 2}}]"], "losses[0].options.weight", "set the weight as losses[0].weight"),
    (["eval.metrics=[accuracy]"], "eval.metrics[0]", "does not apply to super_resolution"),
    (["eval.metrics=[psnr_z]"], "eval.metrics[0]", "unknown metric 'psnr_z'"),
    (["train.precision=fp16"], "train.precision", "fp16 needs a GPU"),
    (["convert.step=20"], "convert.step", "expected a step <= train.steps (10)"),
    (["model.init=/no/such/run"], "model.init", "no complete checkpoint"),
])
def test_registry_and_semantic_errors(overrides, path, expected, tmp_path):
    import torch

    if "fp16" in overrides[0] and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    config = with_(base(), overrides)
    with pytest.raises(ConfigError) as info:
        check_config(config)
    assert info.value.path == path and expected in str(info.value)
    # the trainer fails the same way before building anything
    with pytest.raises(ConfigError):
        Trainer(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base()))
    config = load_config(path, ["train.batch_size=8", "optim.betas=[0.8, 0.99]", "convert.step=3", "model.options.channels=6"])
    assert config.train.batch_size == 8 and config.optim.betas == (0.8, 0.99) and config.convert.step == 3
    assert config.model.options["channels"] == 6
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
    assert load_config(tmp_path / "saved.yaml").to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match="override must look like key.path=value"):
        load_config(path, ["train.batch_size"])


def test_shipped_configs_exist():
    names = {p.stem for p in CONFIGS}
    expected = {f"cifar10_resnet18_{k}" for k in ("conv", "condconv", "involution", "switched")}
    expected |= {f"sr_{k}_x2" for k in ("plain", "switched", "edsr", "rrdb")} | {"vqvae", "staged_switched"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    config = load_config(path)
    check_config(config, training=False)


def test_a_conversion_that_does_not_fit_a_matched_conv_fails_with_the_config_check():
    """convert's layer options are tried on each matched conv of the model (on the meta device):
    a lambda selector needs its 4 heads to divide the conv's input channels (vqvae's encoder.conv2
    reads hidden / 2 = 15 of them here), which fails now, naming the conv, not at convert.step."""
    raw = {"model": {"name": "vqvae", "options": {"hidden_channels": 30, "upsample": "nearest"}},
           "data": {"name": "skimage_photos"}, "train": {"steps": 2}, "losses": [{"name": "mse"}],
           "convert": {"step": 1, "selector": "lambda_then_conv1x1", "include": ["encoder.conv3", "encoder.conv2"]}}
    with pytest.raises(ConfigError, match=r"^convert: converting 'encoder.conv2' of model 'vqvae' to switched fails: "
                                          r"channels \(15\) must be divisible by heads \(4\)"):
        check_config(config_from_dict(raw))
    raw["model"]["options"]["hidden_channels"] = 32
    assert check_config(config_from_dict(raw)) == "reconstruction"


SHARED_SR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sr"


@pytest.mark.skipif(not SHARED_SR.is_dir(), reason=f"shared SR data not found at {SHARED_SR}")
@pytest.mark.parametrize("name", ["sr_plain_x2", "sr_switched_x2", "staged_switched"])
def test_shipped_sr_configs_train_on_the_real_data(name, tmp_path):
    """One step on T91 and one Set5 image: the configs' patch sizes fit every training image."""
    path = next(p for p in CONFIGS if p.stem == name)
    config = load_config(path, [f"data.root={SHARED_SR}", "train.steps=1", "train.batch_size=2", "data.num_workers=0",
                                "eval.max_batches=1", "log.tensorboard=false", "log.progress=false", "convert=null"])
    result = Trainer(config, tmp_path / "run").fit()
    assert result.step == 1 and result.metrics["psnr_y"] > 20
