"""The training engine on CPU: tiny end-to-end runs (classification, SR, VQ-VAE), exact
resume, staged conversion, NaN/inf stop, Ctrl-C, gradient checkpointing, bf16."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dynconv.config import config_from_dict
from dynconv.models import flops
from dynconv.train import Trainer, TrainingError, evaluate
from dynconv.train import checkpoint as ckpt

from helpers import assert_same_weights, final_weights, make_class_data, make_sr_data, sr_config  # noqa: E402


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sr_root(tmp_path_factory) -> Path:
    return make_sr_data(tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def class_root(tmp_path_factory) -> Path:
    return make_class_data(tmp_path_factory.mktemp("cls"))


# ------------------------------------------------------------------------------- end to end
def test_classification_train_and_eval(tmp_path, class_root):
    cfg = config_from_dict({
        "model": {"name": "resnet18_cifar", "options": {"num_classes": 2, "width": 4, "block_conv2": "switched",
                                                        "layer": {"breadth": 2}}},
        "data": {"name": "image_folder", "root": str(class_root)},
        "train": {"steps": 3, "batch_size": 4, "seed": 0},
        "losses": [{"name": "cross_entropy", "options": {"label_smoothing": 0.1}}],
        "optim": {"name": "sgd", "lr": 0.05},
        "eval": {"every": 3, "metrics": ["accuracy", "loss"]},
        "log": {"every": 1, "progress": False, "tensorboard": True, "images_every": 3},
    })
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.fit()
    assert result.step == 3 and set(result.metrics) == {"accuracy", "loss"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert (tmp_path / "run" / "config.yaml").is_file() and list((tmp_path / "run" / "tb").iterdir())
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"start", "train", "routing", "eval", "checkpoint"} <= kinds
    routing = next(e for e in events if e["event"] == "routing")
    assert routing["layers"] and all("entropy" in s for s in routing["layers"].values())
    # params and FLOPs per *input* pixel at the CIFAR default 32x32, as dynconv.models.flops counts them
    start = next(e for e in events if e["event"] == "start")
    assert start["params"] == flops.count_parameters(trainer.raw)
    assert start["flops_per_pixel"] == pytest.approx(flops.flops_per_pixel(trainer.raw, (3, 32, 32)))
    assert start["input_size"] == [3, 32, 32] and start["flops_per"] == "input pixel"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert tb.Scalars("model/params")[0].value == pytest.approx(start["params"])
    assert tb.Scalars("model/flops_per_pixel")[0].value == pytest.approx(start["flops_per_pixel"])
    scored = evaluate(tmp_path / "run")
    assert scored["metrics"]["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert (scored["params"], scored["flops_per_pixel"]) == (start["params"], pytest.approx(start["flops_per_pixel"]))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"] == scored["metrics"]


def test_classification_device_cache_resumes_exactly(tmp_path, class_root):
    raw = {
        "model": {"name": "resnet18_cifar", "options": {"num_classes": 2, "width": 4}},
        "data": {"name": "image_folder", "root": str(class_root), "device_cache": True},
        "train": {"steps": 3, "batch_size": 4},  # 8 images: 2 batches per epoch
        "losses": [{"name": "cross_entropy"}],
        "eval": {"every": 100, "max_batches": 1},
        "log": {"progress": False, "tensorboard": False},
    }
    assert Trainer(config_from_dict(raw), tmp_path / "full").fit().step == 3
    Trainer(config_from_dict(raw), tmp_path / "split").fit(max_steps=1)
    Trainer(config_from_dict(raw), tmp_path / "split", resume=True).fit()
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))


def test_sr_train_and_eval(tmp_path, sr_root):
    cfg = config_from_dict(sr_config(sr_root, eval={"every": 2}, log={"images_every": 2, "tensorboard": True}))
    result = Trainer(cfg, tmp_path / "run").fit()
    assert set(result.metrics) == {"psnr_y", "ssim_y"} and result.metrics["psnr_y"] > 5
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "psnr_y"
    scored = evaluate(tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000004")
    assert scored["metrics"]["psnr_y"] == pytest.approx(result.metrics["psnr_y"])


def test_vqvae_train_and_eval(tmp_path, class_root):
    cfg = config_from_dict({
        "model": {"name": "vqvae", "options": {"hidden_channels": 8, "residual_channels": 4, "residual_layers": 1,
                                               "embedding_dim": 4, "num_embeddings": 8}},
        "data": {"name": "image_folder", "root": str(class_root), "options": {"augment": False}},
        "train": {"steps": 2, "batch_size": 4},
        "losses": [{"name": "mse"}, {"name": "vq_commitment", "weight": 1.0}],
        "eval": {"every": 2},
        "log": {"progress": False, "tensorboard": False},
    })
    result = Trainer(cfg, tmp_path / "run").fit()
    assert set(result.metrics) == {"psnr", "mse"} and np.isfinite(result.metrics["mse"])
    assert evaluate(tmp_path / "run")["metrics"]["mse"] == pytest.approx(result.metrics["mse"])


def test_vqvae_eval_metrics_commitment_and_codebook_usage(tmp_path, class_root):
    """commitment, mse + commitment, and the codebook's perplexity and dead codes over the
    whole eval set (not per batch): the same numbers computed by hand from the model."""
    from dynconv.train.loaders import eval_loader

    metrics = ["mse", "commitment", "mse_plus_commitment", "codebook_perplexity", "dead_codes", "perplexity"]
    cfg = config_from_dict({
        "model": {"name": "vqvae", "options": {"hidden_channels": 8, "residual_channels": 4, "residual_layers": 1,
                                               "embedding_dim": 4, "num_embeddings": 8}},
        "data": {"name": "image_folder", "root": str(class_root), "options": {"augment": False}},
        "train": {"steps": 1, "batch_size": 4},
        "losses": [{"name": "mse"}, {"name": "vq_commitment", "weight": 0.5}],
        "eval": {"every": 1, "batch_size": 1, "metrics": metrics},
        "log": {"progress": False, "tensorboard": False},
    })
    trainer = Trainer(cfg, tmp_path / "run")
    got = trainer.fit().metrics
    model = trainer.raw.eval()
    counts, mse, commitment, n = torch.zeros(8, dtype=torch.float64), 0.0, 0.0, 0
    with torch.no_grad():
        for batch in eval_loader(cfg, trainer.eval_dataset, 0, 1):
            out = model(batch["image"])
            counts += torch.bincount(out["codes"].flatten(), minlength=8).double()
            mse += float(((out["reconstruction"] - batch["image"]) ** 2).mean()) * len(batch["image"])
            commitment += float(out["commitment_loss"]) * len(batch["image"])
            n += len(batch["image"])
    assert n == 2  # one image per class: two eval batches of one
    probs = counts / counts.sum()
    perplexity = float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
    assert got["mse"] == pytest.approx(mse / n) and got["commitment"] == pytest.approx(commitment / n)
    assert got["mse_plus_commitment"] == pytest.approx(got["mse"] + got["commitment"])  # unit weights, not the config's
    assert got["codebook_perplexity"] == pytest.approx(perplexity)
    assert got["dead_codes"] == float((counts == 0).sum()) and got["dead_codes"] >= 8 - 2 * 4  # 2 images x 2x2 latents


@pytest.mark.parametrize("data, size", [
    ({"name": "sr_folder", "root": "x", "options": {"scale": 3}, "train_options": {"patch_size": 96}}, (32, 32)),
    ({"name": "sr_folder", "root": "x"}, (48, 48)),
    ({"name": "image_folder", "root": "x"}, (32, 32)),
    ({"name": "image_folder", "root": "x", "options": {"size": 64}}, (64, 64)),
    ({"name": "skimage_photos"}, (64, 64)),
])
def test_default_input_size_follows_the_data_config(data, size):
    from dynconv.train.experiment import default_input_size

    model = "sr_plain" if "sr" in data["name"] else "vqvae" if data["name"] == "skimage_photos" else "resnet18_cifar"
    cfg = config_from_dict({"model": {"name": model}, "data": data, "train": {"steps": 1}, "losses": [{"name": "l1"}]})
    assert default_input_size(cfg)[:2] == size


# -------------------------------------------------------------------------------- resume
def test_exact_resume(tmp_path, sr_root):
    """N steps + resume + N steps == 2N steps, bitwise: weights, EMA and optimizer state
    (3 batches per epoch, accumulation 2: the resume point is mid-epoch; selector dropout
    and augmentation exercise the RNG and the data position)."""
    raw = sr_config(sr_root, train={"steps": 4, "accumulate": 2, "ema": 0.9},
                    model={"name": "sr_switched", "options": {"channels": 4, "num_layers": 3,
                                                             "layer": {"breadth": 3, "norm_buffer": 2, "selector_dropout": 0.3}}},
                    eval={"every": 2})
    full = Trainer(config_from_dict(raw), tmp_path / "full").fit()
    first = Trainer(config_from_dict(raw), tmp_path / "split").fit(max_steps=2)
    assert first.step == 2 and first.checkpoint.name == "step_00000002"
    resumed = Trainer(config_from_dict(raw), tmp_path / "split", resume=True)
    assert resumed.step == 2 and (resumed.epoch, resumed.batch_in_epoch) == (1, 1)
    second = resumed.fit()
    assert second.step == full.step == 4
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))
    last = lambda run: ckpt.latest_checkpoint(tmp_path / run / "checkpoints")  # noqa: E731
    assert_same_weights(ckpt.load_weights(last("full") / ckpt.EMA_FILE), ckpt.load_weights(last("split") / ckpt.EMA_FILE))
    a, b = ckpt.load_state(last("full")), ckpt.load_state(last("split"))
    for key in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][key].items():
            assert torch.equal(value, b["optimizer"]["state"][key][name])
    assert second.metrics == full.metrics


def test_resume_without_checkpoint_fails(tmp_path, sr_root):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        Trainer(config_from_dict(sr_config(sr_root)), tmp_path / "empty", resume=True)


# -------------------------------------------------------------------------------- staged
@pytest.mark.parametrize("to", ["switched", "condconv"])
def test_staged_conversion_keeps_loss_continuous(tmp_path, sr_root, to, capsys):
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 4}},
                    train={"steps": 3}, convert={"step": 2, "to": to, "include": ["body.*"], "breadth": 3})
    trainer = Trainer(config_from_dict(raw), tmp_path / "run")
    head_weight = trainer.raw.head.weight
    plain_cost = (flops.count_parameters(trainer.raw), flops.flops_per_pixel(trainer.raw, (3, 6, 6)))
    result = trainer.fit()
    assert result.step == 3
    # params and FLOPs/pixel logged at start (plain) and again after the conversion (dynamic, at
    # its active cost), per HR output pixel of the 12 / 2 = 6x6 LR training patch
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    conversion = next(e for e in events if e["event"] == "conversion")
    assert (start["params"], start["flops_per_pixel"]) == (plain_cost[0], pytest.approx(plain_cost[1]))
    assert start["input_size"] == [3, 6, 6] and start["flops_per"] == "HR output pixel"
    assert conversion["params"] == flops.count_parameters(trainer.raw) > start["params"]
    assert conversion["flops_per_pixel"] == pytest.approx(flops.flops_per_pixel(trainer.raw, (3, 6, 6)))
    assert "step 2: converted model: " in capsys.readouterr().out
    (check,) = trainer.conversion_checks
    assert check["difference"] < 1e-5, check
    layer_type = "SwitchedConv2d" if to == "switched" else "CondConv2d"
    assert type(trainer.raw.body[0].conv).__name__ == layer_type
    # the surviving parameters kept their optimizer state; the new ones started at conversion
    state = trainer._optimizer().state
    assert trainer.raw.head.weight is head_weight and int(state[head_weight]["step"]) == 3
    assert int(state[trainer.raw.body[0].conv.weight]["step"]) == 1
    bias_steps = int(state[trainer.raw.body[0].conv.bias]["step"])
    assert bias_steps == (3 if to == "switched" else 1)  # a switched conv's bias is the conv's bias
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert meta["conversions"][0]["step"] == 2 and meta["conversions"][0]["converted"] == ["body.0.conv", "body.1.conv"]
    # the checkpoint rebuilds the converted model
    assert evaluate(tmp_path / "run")["metrics"]["psnr_y"] == pytest.approx(result.metrics["psnr_y"])


def test_resume_across_staged_conversion_is_exact(tmp_path, sr_root):
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    train={"steps": 4}, convert={"step": 2, "include": ["body.*"], "breadth": 2})
    Trainer(config_from_dict(raw), tmp_path / "full").fit()
    Trainer(config_from_dict(raw), tmp_path / "split").fit(max_steps=3)
    Trainer(config_from_dict(raw), tmp_path / "split", resume=True).fit()
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))


def test_convert_lr_scale_puts_converted_layers_in_a_scaled_group(tmp_path, sr_root):
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    train={"steps": 6}, schedule={"name": "cosine", "warmup_steps": 1},
                    convert={"step": 2, "include": ["body.*"], "breadth": 2, "lr_scale": 3.0})
    trainer = Trainer(config_from_dict(raw), tmp_path / "full")
    trainer.fit(max_steps=4)
    base, scaled = trainer._optimizer().param_groups
    converted = {id(p) for p in trainer.raw.body.parameters()}
    assert {id(p) for p in scaled["params"]} == converted
    assert not converted & {id(p) for p in base["params"]}
    # the schedule drives both groups; the converted layers stay at 3x the rate
    assert base["initial_lr"] == pytest.approx(0.01) and scaled["initial_lr"] == pytest.approx(0.03)
    assert 0 < base["lr"] < base["initial_lr"] and scaled["lr"] == pytest.approx(3 * base["lr"])
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints"))
    assert meta["conversions"][0]["lr_scale"] == 3.0
    # a resume rebuilds the groups from the checkpoint and continues exactly
    trainer.fit()
    Trainer(config_from_dict(raw), tmp_path / "split").fit(max_steps=4)
    Trainer(config_from_dict(raw), tmp_path / "split", resume=True).fit()
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))
    # the scale changes what the converted layers learn
    raw["convert"]["lr_scale"] = 1.0
    Trainer(config_from_dict(raw), tmp_path / "unscaled").fit()
    unscaled = final_weights(tmp_path / "unscaled")
    assert not torch.equal(unscaled["body.0.conv.weight"], final_weights(tmp_path / "full")["body.0.conv.weight"])


@pytest.mark.parametrize("to", ["switched", "condconv"])
def test_carry_optimizer_state_copies_the_kernels_state_into_every_expert(to):
    from dynconv.convert import convert
    from dynconv.train.experiment import carry_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 1))
    old_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        old_opt.zero_grad()
        model(torch.randn(2, 3, 5, 5)).square().mean().backward()
        old_opt.step()
    old_params = dict(model.named_parameters())
    before = {name: {k: v.clone() for k, v in old_opt.state[p].items()} for name, p in old_params.items()}
    convert(model, to=to, include=["0"], **({"breadth": 3} if to == "switched" else {"num_experts": 3}))
    fresh, copied = (torch.optim.Adam(model.parameters(), lr=1e-3) for _ in range(2))
    carry_optimizer_state(old_opt, old_params, fresh, model)
    carry_optimizer_state(old_opt, old_params, copied, model, copy_into_experts=True)
    experts = model[0].weight
    assert experts.shape == (3, 4, 3, 3, 3) and experts not in fresh.state  # the default: fresh
    for e in range(3):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(copied.state[experts][key][e], before["0.weight"][key])
    assert int(copied.state[experts]["step"]) == 3
    bias = model[0].bias  # switched: the conv's own bias (same shape, kept either way); CondConv: one per expert
    rows = [copied.state[bias]["exp_avg"]] if to == "switched" else list(copied.state[bias]["exp_avg"])
    assert len(rows) == (1 if to == "switched" else 3)
    for row in rows:
        assert torch.equal(row, before["0.bias"]["exp_avg"])
    assert bias in fresh.state if to == "switched" else bias not in fresh.state
    # the copies are the kernel's own state repeated, not views of one tensor
    copied.state[experts]["exp_avg"][0].zero_()
    assert torch.equal(copied.state[experts]["exp_avg"][1], before["0.weight"]["exp_avg"])


def test_convert_optimizer_state_copy_continues_the_step_count(tmp_path, sr_root):
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    optim={"name": "adam", "lr": 1e-3}, train={"steps": 3},
                    convert={"step": 2, "include": ["body.*"], "breadth": 2, "optimizer_state": "copy"})
    trainer = Trainer(config_from_dict(raw), tmp_path / "run")
    trainer.fit()
    state = trainer._optimizer().state
    assert int(state[trainer.raw.body[0].conv.weight]["step"]) == 3  # fresh would be 1 (see the staged test)
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert meta["conversions"][0]["optimizer_state"] == "copy"
    raw["convert"]["optimizer_state"] = "keep"
    from dynconv.config import ConfigError
    with pytest.raises(ConfigError, match=r"convert\.optimizer_state"):
        config_from_dict(raw)


def test_convert_lr_scale_must_be_positive(sr_root):
    from dynconv.config import ConfigError

    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    convert={"step": 2, "lr_scale": 0})
    with pytest.raises(ConfigError, match=r"convert\.lr_scale.*> 0, got 0"):
        config_from_dict(raw)


# ----------------------------------------------------------------------------- stopping
def _register_test_loss():
    from dynconv.losses import LOSSES, register_loss

    if "test_scripted" in LOSSES:
        return

    @register_loss("test_scripted")
    class ScriptedLoss(torch.nn.Module):
        """L1, but returns NaN / raises SIGINT on the call numbers given (for tests)."""

        calls = 0

        def __init__(self, nan_at: int = -1, sigint_at: int = -1) -> None:
            super().__init__()
            self.nan_at, self.sigint_at, self.calls = nan_at, sigint_at, 0

        def forward(self, outputs, batch):
            self.calls += 1
            loss = (outputs["sr"] - batch["hr"]).abs().mean()
            if self.calls == self.sigint_at:
                os.kill(os.getpid(), signal.SIGINT)
            if self.calls == self.nan_at:
                loss = loss * float("nan")
            return loss


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, sr_root):
    _register_test_loss()
    raw = sr_config(sr_root, losses=[{"name": "test_scripted", "options": {"nan_at": 3}}], train={"steps": 5})
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 3") as info:
        Trainer(config_from_dict(raw), tmp_path / "run").fit()
    assert "step_00000002" in str(info.value)
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step_00000002" and ckpt.read_meta(latest)["reason"] == "nonfinite"
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "nonfinite" and e["step"] == 3 for e in events)


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, sr_root):
    _register_test_loss()
    raw = sr_config(sr_root, losses=[{"name": "test_scripted", "options": {"sigint_at": 2}}], train={"steps": 4})
    result = Trainer(config_from_dict(raw), tmp_path / "run").fit()
    assert result.interrupted and result.step == 2 and result.checkpoint.name == "step_00000002"
    assert ckpt.read_meta(result.checkpoint)["reason"] == "interrupt"
    raw["losses"] = [{"name": "l1"}]
    assert Trainer(config_from_dict(raw), tmp_path / "run", resume=True).fit().step == 4


# --------------------------------------------------------------------- engine options
def test_gradient_checkpointing_gives_the_same_training(tmp_path, sr_root):
    """Recomputation runs with statistics frozen and buffers restored: weights and SwitchNorm
    buffers match a run without checkpointing (each buffer updated once per step)."""
    runs = {}
    for flag in (False, True):
        raw = sr_config(sr_root, train={"steps": 3, "checkpointing": flag})
        trainer = Trainer(config_from_dict(raw), tmp_path / f"run{flag}")
        trainer.fit()
        runs[flag] = trainer.raw.state_dict()
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-5, atol=1e-6, msg=key)
    assert int(runs[True]["body.0.conv.norm.write_index"]) == int(runs[False]["body.0.conv.norm.write_index"])


def test_bf16_channels_last_grad_clip_step_schedule_on_cpu(tmp_path, sr_root):
    raw = sr_config(sr_root, train={"steps": 2, "precision": "bf16", "channels_last": True}, optim={"grad_clip": 1.0},
                    schedule={"name": "step", "milestones": [1], "warmup_steps": 0})
    result = Trainer(config_from_dict(raw), tmp_path / "run").fit()
    assert result.step == 2
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in events if e["event"] == "train"]
    assert lrs == pytest.approx([0.01, 0.001])


def test_epochs_and_keep_last(tmp_path, sr_root):
    raw = sr_config(sr_root, train={"steps": None, "epochs": 2},
                    log={"checkpoint_every": 1, "keep_last": 2}, eval={"every": 1})
    trainer = Trainer(config_from_dict(raw), tmp_path / "run")
    assert trainer.total_steps == 6  # 6 images / batch 2 = 3 steps per epoch
    trainer.fit()
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    best = ckpt.read_best(tmp_path / "run" / "checkpoints")
    assert steps[-2:] == [5, 6] and set(steps) <= {5, 6, best["step"]}
