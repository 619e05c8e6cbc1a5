"""Annealed layer attributes (``anneal``: Dynamic Convolution's temperature): the value at each
step, which layers it sets, the config checks, the log, exact resume, evaluation of a checkpoint
with the last step's value, and layers added by a staged conversion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dynconv import CondConv2d
from dynconv.config import AnnealConfig, ConfigError, config_from_dict
from dynconv.models import build_model
from dynconv.train import Trainer, evaluate, load_checkpoint_model
from dynconv.train.schedule import anneal_value, annealed_layers, annealed_state, restore_annealed, set_annealed

from helpers import assert_same_weights, final_weights, sr_config  # noqa: E402


def _anneal(**fields) -> AnnealConfig:
    return config_from_dict({"model": {"name": "sr_plain"}, "data": {"name": "sr_folder"}, "train": {"steps": 1},
                             "losses": [{"name": "l1"}], "anneal": [fields]}).anneal[0]


def test_value_is_linear_then_held():
    by_steps = _anneal(start=30, end=1, steps=10)
    assert [anneal_value(by_steps, s, steps_per_epoch=7) for s in (0, 5, 10, 11, 1000)] == [30.0, 15.5, 1.0, 1.0, 1.0]
    by_epochs = _anneal(start=30, end=1, epochs=2)  # 2 epochs of 5 steps: the paper's 10 of 100, scaled
    assert anneal_value(by_epochs, 0, 5) == 30.0
    assert anneal_value(by_epochs, 5, 5) == pytest.approx(15.5)
    assert anneal_value(by_epochs, 10, 5) == 1.0
    with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1, got 0"):
        anneal_value(by_epochs, 3, 0)


@pytest.mark.parametrize("fields, path, message", [
    ({"start": 30, "end": 1}, "anneal[0].steps", "give exactly one of steps or epochs"),
    ({"start": 30, "end": 1, "steps": 5, "epochs": 1}, "anneal[0].steps", "give exactly one of steps or epochs"),
    ({"start": 30, "end": 1, "epochs": 0}, "anneal[0].epochs", "expected a value >= 1, got 0"),
    ({"start": 0, "end": 1, "steps": 5}, "anneal[0].start", "expected a value > 0, got 0"),
    ({"start": 30, "end": -1, "steps": 5}, "anneal[0].end", "expected a value > 0, got -1"),
    ({"start": 30, "end": 1, "steps": 5, "include": []}, "anneal[0].include", "at least one module-name pattern"),
    ({"start": 30, "end": 1, "steps": 5, "attribute": "tau"}, "anneal[0].attribute", "expected one of ['temperature']"),
])
def test_config_errors_name_the_key(fields, path, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: .*{re.escape(message)}"):
        _anneal(**fields)


def test_layers_it_sets_and_the_state_a_checkpoint_keeps():
    model = build_model("resnet18_cifar", width=4, block_conv2="condconv", block_conv2_stages=[1, 2],
                        layer={"num_experts": 2, "routing": "softmax", "temperature": 30.0})
    every = annealed_layers(model, _anneal(start=30, end=1, steps=4))
    # the CondConv2d layers only, not also the router inside each
    assert list(every) == ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.1.conv2"]
    assert all(isinstance(m, CondConv2d) for m in every.values())
    assert list(annealed_layers(model, _anneal(start=30, end=1, steps=4, include=["layer2.*"]))) == ["layer2.0.conv2", "layer2.1.conv2"]
    values = set_annealed(model, [_anneal(start=30, end=2, steps=4, include=["layer1.*"])], step=2, steps_per_epoch=1)
    assert values == {"anneal/temperature": 16.0}
    assert [m.temperature for m in every.values()] == [16.0, 16.0, 30.0, 30.0]
    assert model.layer1[0].conv2.route.temperature == 16.0  # what the softmax divides by
    two = [_anneal(start=30, end=2, steps=4, include=["layer1.*"]), _anneal(start=8, end=1, steps=1, include=["layer2.*"])]
    assert set_annealed(model, two, 4, 1) == {"anneal/temperature[0]": 2.0, "anneal/temperature[1]": 1.0}
    state = annealed_state(model, two)
    assert state == {"layer1.0.conv2": {"temperature": 2.0}, "layer1.1.conv2": {"temperature": 2.0},
                     "layer2.0.conv2": {"temperature": 1.0}, "layer2.1.conv2": {"temperature": 1.0}}
    fresh = build_model("resnet18_cifar", width=4, block_conv2="condconv", block_conv2_stages=[1, 2],
                        layer={"num_experts": 2, "routing": "softmax", "temperature": 30.0})
    restore_annealed(fresh, state)
    assert annealed_state(fresh, two) == state


def _condconv_config(root: Path, **sections) -> dict:
    model = {"name": "sr_condconv", "options": {"channels": 4, "num_layers": 3,
                                                "layer": {"num_experts": 2, "routing": "softmax", "temperature": 30.0}}}
    return sr_config(root, model=model, anneal=[{"start": 30.0, "end": 2.0, "steps": 4}], **sections)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_trainer_anneals_logs_resumes_exactly_and_evaluates_with_the_last_value(tmp_path, sr_root):
    raw = _condconv_config(sr_root, train={"steps": 6, "ema": 0.9}, eval={"every": 3})
    full = Trainer(config_from_dict(raw), tmp_path / "full")
    result = full.fit()
    # the train record of step k: the value step k used (step k-1 counted from 0), 30 -> 2 over 4 steps
    logged = [(r["step"], r["anneal/temperature"]) for r in _log(tmp_path / "full") if r["event"] == "train"]
    assert logged == [(1, 30.0), (2, 23.0), (3, 16.0), (4, 9.0), (5, 2.0), (6, 2.0)]
    assert all(m.temperature == 2.0 for m in annealed_layers(full.raw, full.config.anneal[0]).values())
    assert all(m.temperature == 2.0 for m in annealed_layers(full.ema.module, full.config.anneal[0]).values())
    # interrupted after step 2, resumed: the same values, weights and metrics
    Trainer(config_from_dict(raw), tmp_path / "split").fit(max_steps=2)
    resumed = Trainer(config_from_dict(raw), tmp_path / "split", resume=True)
    second = resumed.fit()
    resumed_log = [(r["step"], r["anneal/temperature"]) for r in _log(tmp_path / "split") if r["event"] == "train"]
    assert resumed_log == logged
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))
    assert second.metrics == result.metrics
    # a checkpoint is evaluated at its last step's temperature (2), not the config's 30
    model, _, meta = load_checkpoint_model(tmp_path / "full")
    layers = annealed_layers(full.raw, full.config.anneal[0])
    assert layers and meta["annealed"] == {name: {"temperature": 2.0} for name in layers}
    assert model.body[0].conv.temperature == 2.0
    assert evaluate(tmp_path / "full")["metrics"] == pytest.approx(result.metrics)


def test_an_anneal_that_sets_nothing_fails_unless_a_conversion_adds_the_layers(tmp_path, sr_root):
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    anneal=[{"start": 30.0, "end": 1.0, "steps": 2}])
    with pytest.raises(ConfigError, match=r"anneal\[0\]\.include: no layer matching \['\*'\] has the attribute 'temperature'"):
        Trainer(config_from_dict(raw), tmp_path / "plain")
    # staged: plain convs -> Dynamic Convolution (softmax) at step 2, annealed from then on
    staged = dict(raw, anneal=[{"start": 30.0, "end": 1.0, "steps": 4}],
                  convert={"step": 2, "to": "condconv", "include": ["body.*"], "breadth": 2,
                           "options": {"routing": "softmax", "temperature": 30.0}})
    staged["train"] = {**staged["train"], "steps": 3}
    trainer = Trainer(config_from_dict(staged), tmp_path / "staged")
    trainer.fit()
    assert [r["anneal/temperature"] for r in _log(tmp_path / "staged") if r["event"] == "train"] == [30.0, 22.75, 15.5]
    assert trainer.raw.body[0].conv.temperature == 15.5
    assert torch.isfinite(trainer.raw.body[0].conv.weight).all()
