"""``train.stop_on_plateau``: the rule's arithmetic, and a run that stops on it, records why,
resumes the rule's state exactly and does not train on when resumed after the stop."""

from __future__ import annotations

import json
import math

import pytest

from dynconv.config import ConfigError, PlateauConfig, config_from_dict
from dynconv.train import Trainer
from dynconv.train import checkpoint as ckpt
from dynconv.train.experiment import check_config
from dynconv.train.plateau import PlateauRule

from helpers import assert_same_weights, final_weights, sr_config  # noqa: E402


# ----------------------------------------------------------------------------------- the rule
def test_rule_counts_evaluations_without_a_relative_improvement():
    rule = PlateauRule(PlateauConfig(metric="loss", min_rel_improvement=0.1, patience=2), "min")
    assert not rule.update(1, 1.0)  # the first value is the reference
    assert not rule.update(2, 0.95)  # 5% better: not enough, 1 without improvement
    assert not rule.update(3, 0.89)  # 11% below the reference 1.0: improved, count restarts
    assert (rule.reference, rule.reference_step, rule.evals_without_improvement) == (0.89, 3, 0)
    assert not rule.update(4, math.nan)  # a non-finite value never improves
    assert rule.update(5, 0.85)  # 4.5% below 0.89: the second in a row without improvement
    assert rule.stopped == {"reason": "plateau", "step": 5, "value": 0.85, "reference": 0.89, "reference_step": 3,
                            "evals_without_improvement": 2, "metric": "loss", "mode": "min",
                            "min_rel_improvement": 0.1, "patience": 2, "min_steps": 0}
    assert not rule.update(6, 0.1)  # stopped for good
    assert "did not get 10.00% below 0.89 (step 3) in 2 evaluations; stopped at step 5" in rule.describe_stop()


def test_rule_direction_min_steps_and_state():
    rule = PlateauRule(PlateauConfig(metric="psnr", min_rel_improvement=0.01, patience=1, min_steps=4), "max")
    rule.update(1, 20.0)
    assert not rule.update(2, 19.0)  # worse, but before min_steps
    assert rule.update(3, 20.1) is False and rule.evals_without_improvement == 2  # +0.5% < 1%
    assert rule.update(4, 20.15)
    again = PlateauRule(PlateauConfig(metric="psnr", min_rel_improvement=0.01, patience=1, min_steps=4), "max")
    again.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert again.state_dict() == rule.state_dict()
    other = PlateauRule(PlateauConfig(metric="psnr", min_rel_improvement=0.02, patience=1), "max")
    with pytest.warns(UserWarning, match="starts over"):
        other.load_state_dict(rule.state_dict())
    assert other.reference is None and other.stopped is None
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        PlateauRule(PlateauConfig(metric="psnr"), "up")


def test_config_errors_name_the_key(sr_root):
    raw = sr_config(sr_root, train={"stop_on_plateau": {"metric": "psnr_y", "min_rel_improvement": 1.5}})
    with pytest.raises(ConfigError, match=r"train.stop_on_plateau.min_rel_improvement: .*\[0, 1\).*1.5"):
        config_from_dict(raw)
    raw = sr_config(sr_root, train={"stop_on_plateau": {"metric": "psnr_y", "patience": 0}})
    with pytest.raises(ConfigError, match="train.stop_on_plateau.patience"):
        config_from_dict(raw)
    raw = sr_config(sr_root, train={"stop_on_plateau": {"metric": "mse"}})
    with pytest.raises(ConfigError, match=r"train.stop_on_plateau.metric: expected one of the evaluated metrics \['psnr_y', 'ssim_y'\]"):
        check_config(config_from_dict(raw))


# ------------------------------------------------------------------------------------ in a run
def _plateau_config(sr_root, **train):
    # PSNR cannot gain 50% in a few steps: the rule counts every evaluation after the first
    return config_from_dict(sr_config(
        sr_root, train={"steps": 12, **train,
                        "stop_on_plateau": {"metric": "psnr_y", "min_rel_improvement": 0.5, "patience": 3}},
        eval={"every": 1}, log={"checkpoint_every": 2}))


def test_run_stops_on_plateau_and_records_why(tmp_path, sr_root):
    result = Trainer(_plateau_config(sr_root), tmp_path / "run").fit()
    assert result.step == 4 and result.total_steps == 12  # reference at step 1, 3 evaluations without improvement
    assert result.stopped["reason"] == "plateau" and result.stopped["step"] == 4 and result.stopped["reference_step"] == 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    event = next(r for r in log if r["event"] == "plateau")
    assert event["step"] == 4 and event["metric"] == "psnr_y" and event["evals_without_improvement"] == 3
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    meta = ckpt.read_meta(last)
    assert meta["step"] == 4 and meta["reason"] == "plateau" and meta["stopped"] == result.stopped
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped"] == result.stopped
    # resuming the finished run trains nothing and reports the same stop
    again = Trainer(_plateau_config(sr_root), tmp_path / "run", resume=True).fit()
    assert again.step == 4 and again.stopped == result.stopped
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") == last


def test_resumed_run_continues_the_rule_exactly(tmp_path, sr_root):
    """Killed after step 2 (reference at 1, one evaluation without improvement), the resumed
    run stops at step 4 like the uninterrupted one, with the same weights; a rule that
    restarted at the resume would run to step 6."""
    full = Trainer(_plateau_config(sr_root), tmp_path / "full").fit()
    Trainer(_plateau_config(sr_root), tmp_path / "split").fit(max_steps=2)
    resumed = Trainer(_plateau_config(sr_root), tmp_path / "split", resume=True).fit()
    assert resumed.step == full.step == 4 and resumed.stopped == full.stopped
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))
