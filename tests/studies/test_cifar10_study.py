"""configs/studies/cifar10_resnet18.yaml: its profiles resolve to the intended recipes, every
variant's ResNet builds, trains a step and reports params and FLOPs; a tiny version of the study
(its own variants, a tiny ResNet, generated images packed like ../shared/data/cifar10-jpeg) runs
end to end with seconds per epoch, forward latency and an archive as the eval set; the speed
numbers and columns."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from dynconv import CondConv2d, Involution2d, SwitchedConv2d
from dynconv import cli
from dynconv.config import config_from_dict
from dynconv.studies import load_study
from dynconv.studies.results import results_table, summary
from dynconv.studies.spec import StudyError, check_plan
from dynconv.train.evaluation import eval_set_split
from dynconv.train.experiment import apply_conversion, build_experiment_model, conversion_record, model_cost
from dynconv.train.speed import training_speed

STUDY = Path(__file__).resolve().parents[2] / "configs" / "studies" / "cifar10_resnet18.yaml"
VARIANTS = ["conv", "involution", "condconv", "dynamic_conv", "switched", "switched_layer12", "switched_detach",
            "switched_layer12_detach", "switched_b2_detach", "staged_switched", "staged_switched_detach"]
THREE_SEEDS = {"conv", "involution", "condconv", "dynamic_conv", "switched", "switched_layer12", "staged_switched"}


def _plan(profile: str, tmp: Path):
    plan = load_study(STUDY, profile=profile, out=tmp / profile, check=False)  # the data may be absent here
    check_plan(plan)  # every run's config as `dynconv train` checks it
    return plan


# ------------------------------------------------------------------------------ the study file
@pytest.mark.parametrize("profile, width, steps, batch, lr, precision", [
    ("cpu", 16, 2400, 64, 0.05, "fp32"),
    ("gpu", 64, 30 * 781, 64, 0.05, "fp32"),  # the report's recipe: 30 epochs of 50,000 // 64 steps
    ("gpu_fast", 64, 30 * 97, 512, 0.4, "bf16"),
])
def test_profiles_resolve_to_the_recipes(tmp_path, profile, width, steps, batch, lr, precision):
    plan = _plan(profile, tmp_path)
    assert list(plan.variants) == VARIANTS and plan.baseline == "conv" and plan.latency_batch_size == 64
    assert {v: info["seeds"] for v, info in plan.variants.items()} == {
        v: [0, 1, 2] if v in THREE_SEEDS else [0] for v in VARIANTS}
    assert plan.eval_sets["test"].name == "test.tar.gz"
    for run in plan.runs:
        cfg = config_from_dict(run.config)
        assert (cfg.model.options["width"], cfg.train.steps, cfg.train.batch_size, cfg.optim.lr, cfg.train.precision) == (
            width, steps, batch, lr, precision)
        assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.train.channels_last == (profile == "gpu_fast")
        assert cfg.data.device_cache and cfg.eval.metrics == ["accuracy"]
        if run.variant.startswith("staged_switched"):
            assert run.branch_from.variant == "conv" and run.branch_from.step == cfg.convert.step == steps * 2 // 3
            assert cfg.convert.include == ["layer*.conv2"] and cfg.convert.breadth == 8
            assert cfg.convert.options.get("detach_selector_input", False) == run.variant.endswith("_detach")
        if run.variant.startswith("switched"):  # from scratch
            assert cfg.model.options["layer"].get("detach_selector_input", False) == run.variant.endswith("_detach")
        if run.variant == "dynamic_conv":
            (anneal,) = cfg.anneal
            assert (anneal.start, anneal.end, anneal.steps) == (30.0, 1.0, steps // 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_trains_a_step_and_reports_its_cost(tmp_path, variant):
    """At the cpu profile's width 16: the second conv of the chosen stages is the variant's layer,
    a forward/backward runs, and params / active FLOPs per image are counted."""
    run = next(r for r in _plan("cpu", tmp_path).runs if r.variant == variant)
    cfg = config_from_dict(run.config)
    torch.manual_seed(0)
    model = build_experiment_model(cfg)
    if cfg.convert is not None:  # staged: the model after its conversion
        apply_conversion(model, conversion_record(cfg.convert, cfg.convert.step))
    expected = {"conv": nn.Conv2d, "involution": Involution2d, "condconv": CondConv2d, "dynamic_conv": CondConv2d,
                "switched": SwitchedConv2d, "switched_layer12": SwitchedConv2d, "switched_detach": SwitchedConv2d,
                "switched_layer12_detach": SwitchedConv2d, "switched_b2_detach": SwitchedConv2d,
                "staged_switched": SwitchedConv2d, "staged_switched_detach": SwitchedConv2d}[variant]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        high_resolution_only = variant.startswith("switched_layer12") and stage in (model.layer3, model.layer4)
        assert all(type(block.conv2) is (nn.Conv2d if high_resolution_only else expected) for block in stage)
        assert all(type(block.conv1) is nn.Conv2d for block in stage)
    if variant == "dynamic_conv":
        assert model.layer1[0].conv2.routing == "softmax" and model.layer1[0].conv2.temperature == 30.0
    if expected is SwitchedConv2d:
        assert model.layer1[0].conv2.detach_selector_input == variant.endswith("_detach")
        assert model.layer1[0].conv2.breadth == (2 if variant == "switched_b2_detach" else 8)
    model.train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    cost = model_cost(model, cfg)
    assert cost["params"] > 0 and cost["flops_per_pixel"] > 0 and cost["input_size"] == [3, 32, 32]


# ------------------------------------------------------------------------------ a tiny study
def _write_image(path: Path, rng: np.random.Generator, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def make_cifar_archives(root: Path, classes=("cat", "dog", "frog"), train: int = 4, test: int = 2, size: int = 16) -> Path:
    """``root/train.tar.gz`` and ``root/test.tar.gz`` of ``<split>/<class>/<n>.png``: the layout of
    ../shared/data/cifar10-jpeg, with random images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in classes:
            for i in range(count):
                _write_image(root / split / c / f"{i:04d}.png", rng, size)
        with tarfile.open(root / f"{split}.tar.gz", "w:gz") as archive:
            archive.add(root / split, arcname=split)
        shutil.rmtree(root / split)
    return root


def _tiny_study(tmp: Path, data_root: Path) -> Path:
    """The real study's base and variants (conv, dynamic_conv, switched_layer12, staged_switched),
    with a tiny profile: width 4, 6 steps of 4 images, the branch at 4, the anneal over 3 steps."""
    study = yaml.safe_load(STUDY.read_text())
    study["base"] = str((STUDY.parent / study["base"]).resolve())
    study["variants"] = {v: study["variants"][v] for v in ("conv", "dynamic_conv", "switched_layer12", "staged_switched")}
    for variant in study["variants"].values():
        variant.pop("seeds", None)
    study["latency_batch_size"] = 4
    study["vars"] = {"branch": 4, "anneal_steps": 3}
    study["profiles"] = {"tiny": {"set": {
        "data.root": str(data_root), "model.options.width": 4, "train.steps": 6, "train.batch_size": 4,
        "eval.every": 6, "eval.batch_size": 4, "log": {"every": 2, "checkpoint_every": 3, "progress": False, "tensorboard": False}}}}
    # SwitchNorm's usage buffer fills within the 6 steps
    study["variants"]["switched_layer12"]["set"]["model.options.layer"]["norm_buffer"] = 2
    study["variants"]["staged_switched"]["set"]["convert"]["options"]["norm_buffer"] = 2
    path = tmp / "cifar_tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar_study")
    study = _tiny_study(tmp, make_cifar_archives(tmp / "cifar"))
    out = tmp / "out"
    code = cli.main(["study", str(study), "--profile", "tiny", "--out", str(out), "--progress-every", "1000"])
    assert code == cli.EXIT_OK
    return out


def _log(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_tiny_cifar_study_end_to_end(tiny_study):
    data = json.loads((tiny_study / "study.json").read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert [(r["variant"], r["status"]) for r in data["runs"]] == [
        ("conv", "done"), ("dynamic_conv", "done"), ("switched_layer12", "done"), ("staged_switched", "done")]
    for run in runs.values():
        assert 0.0 <= run["eval"]["test"]["accuracy"] <= 1.0  # scored on the test archive
        speed = run["speed"]
        assert speed["steps_per_epoch"] == 3 and speed["device"] == "cpu"  # 12 training images, batch 4
        assert speed["seconds_per_epoch"] == pytest.approx(3 * speed["seconds_per_step"]) and speed["seconds_per_step"] > 0
        forward = run["forward"]
        assert forward["ms"] > 0 and forward["batch_size"] == 4 and forward["input_size"] == [3, 32, 32]
        assert forward["device"] == "cpu" and "threads" in forward["device_name"] and forward["peak_memory_mib"] is None
    assert runs["switched_layer12"]["params"] > runs["conv"]["params"]
    assert runs["staged_switched"]["params"] > runs["switched_layer12"]["params"]  # all four stages switched
    # staged: the conv run's state at step 4, then layer*.conv2 -> switched
    staged_log = _log(runs["staged_switched"]["run_dir"])
    assert staged_log[0]["event"] == "resume" and staged_log[0]["step"] == 4
    (conversion,) = [r for r in staged_log if r["event"] == "conversion"]
    assert conversion["step"] == 4 and len(conversion["converted"]) == 8
    assert all(name.startswith("layer") and name.endswith(".conv2") for name in conversion["converted"])
    # Dynamic Convolution: temperature 30 -> 1 over 3 steps, logged with the train records
    temperatures = [r["anneal/temperature"] for r in _log(runs["dynamic_conv"]["run_dir"]) if r["event"] == "train"]
    assert temperatures == [pytest.approx(30 - 29 / 3), 1.0, 1.0]
    # the table: FLOPs per image, s/epoch with its ratio to conv, forward ms at batch 4, what they mean
    entry = data["summary"]["dynamic_conv"]
    # costs and the forward are quoted at CIFAR's 32 x 32 (the data config names no size)
    assert entry["flops_per_image"] == pytest.approx(entry["flops_per_pixel"] * 32 * 32)
    results = (tiny_study / "results.md").read_text()
    header = next(line for line in results.splitlines() if line.startswith("| variant"))
    assert all(column in header for column in ("FLOPs/image", "s/epoch", "fwd ms (b4)", "accuracy"))
    assert "(1.00x)" in results and "median of 10 inference forwards at batch 4" in results


def test_speed_from_log_records():
    records = [{"event": "start", "step": 0, "steps_per_epoch": 100, "device": "cuda:0"},
               {"event": "train", "step": 10, "step_seconds": 0.9},  # the first window: warm-up
               {"event": "train", "step": 20, "step_seconds": 0.2, "peak_memory_mib": 100.0},
               {"event": "train", "step": 30, "step_seconds": 0.3, "peak_memory_mib": 120.0},
               {"event": "eval", "step": 30}]
    assert training_speed(records) == {"seconds_per_step": 0.3, "steps_per_epoch": 100,
                                       "seconds_per_epoch": pytest.approx(30.0), "peak_memory_mib": 120.0,
                                       "device": "cuda:0"}
    # a log written before these numbers existed
    assert training_speed([{"event": "start", "step": 0}, {"event": "train", "step": 5}]) == {
        "seconds_per_step": None, "steps_per_epoch": None, "seconds_per_epoch": None, "peak_memory_mib": None,
        "device": None}


def test_speed_columns_quote_the_ratio_to_the_baseline(tmp_path):
    plan = _plan("cpu", tmp_path)

    def record(variant, seconds, ms):
        return {"variant": variant, "seed": 0, "status": "done", "params": 10, "flops_per_pixel": 68_450.0,
                "flops_per": "input pixel", "input_size": [3, 32, 32], "train_seconds": 5.0, "steps": 4, "eval": {},
                "speed": {"seconds_per_epoch": seconds}, "forward": {"ms": ms, "batch_size": 64, "device_name": "cpu",
                                                                     "precision": "fp32", "channels_last": False, "repeats": 10}}
    data = {"summary": summary(plan, [record("conv", 10.0, 1.5), record("involution", 25.0, 3.0)])}
    rows = {row["variant"]: row for row in results_table(plan, data)}
    assert rows["conv"]["s/epoch"] == "10.0 (1.00x)" and rows["involution (3x3)"]["s/epoch"] == "25.0 (2.50x)"
    assert rows["involution (3x3)"]["fwd ms (b64)"] == "3.00" and rows["conv"]["FLOPs/image"] == "70.1M"


def test_an_archive_is_an_eval_set(tmp_path):
    root = make_cifar_archives(tmp_path / "cifar", train=1, test=1)
    assert eval_set_split(root / "test.tar.gz") == (root.resolve(), "test")
    (root / "folder").mkdir()
    assert eval_set_split(root / "folder") == (root.resolve(), "folder")
    with pytest.raises(FileNotFoundError, match=r"missing\.zip is neither a folder nor a \.tar\.gz/\.tgz/\.tar archive"):
        eval_set_split(root / "missing.zip")
    study = _tiny_study(tmp_path, root)
    raw = yaml.safe_load(study.read_text())
    raw["eval_sets"] = {"test": "nope.tar.gz"}
    study.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match=r"eval_sets\.test: folder \(or \.tar/\.tar\.gz of one\) not found: .*nope\.tar\.gz"):
        load_study(study, profile="tiny", out=tmp_path / "out")
