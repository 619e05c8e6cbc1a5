"""The VQ-VAE study's machinery: a tiny study (generated photos, a few steps) runs a plain
VQ-VAE to its plateau and branches from that checkpoint - the branches start from the same
weights, optimizer state and step, and converting the 8 convs leaves the loss unchanged there;
``datasets``, ``branch_from.step: final | plateau`` + ``more_steps`` + ``${branch_step}`` and
``null`` eval sets in the plan; relative changes; and configs/studies/vqvae.yaml itself."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dynconv import cli
from dynconv.models import build_model
from dynconv.models.flops import count_parameters
from dynconv.models.vqvae import INCLUDE_4_PLUS_4
from dynconv.studies import StudyError, load_study
from dynconv.studies.results import paired_relative_change
from dynconv.studies.spec import resolve_branch

REPO = Path(__file__).resolve().parents[2]
METRICS = ["mse_plus_commitment", "mse", "commitment", "psnr", "codebook_perplexity", "dead_codes"]


def _photos(root: Path, n: int = 6, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))).save(root / f"p{i}.png")
    return root


def _write_study(tmp: Path, photos: Path, **changes) -> Path:
    base = {
        "model": {"name": "vqvae", "options": {"hidden_channels": 8, "residual_channels": 4, "residual_layers": 2,
                                               "embedding_dim": 4, "num_embeddings": 16, "upsample": "nearest"}},
        "data": {"name": "folder_crops", "root": str(photos), "eval_split": "test",
                 "options": {"size": 8, "holdout_every": 3, "mean": [0.5] * 3, "std": [1.0] * 3}},
        "train": {"steps": 30, "batch_size": 4},
        "losses": [{"name": "mse"}, {"name": "vq_commitment"}],
        "optim": {"name": "adam", "lr": 1.0e-3},
        "eval": {"every": 1, "batch_size": 8, "metrics": METRICS, "best_metric": "mse_plus_commitment", "best_mode": "min"},
        "log": {"every": 1, "checkpoint_every": 100, "keep_last": 20, "progress": False, "tensorboard": False},
    }
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    branch = {"variant": "pretrain", "step": "plateau", "more_steps": 2}
    study = {
        "base": "base.yaml", "baseline": "plain", "seeds": [0], "relative_change": True,
        "metrics": ["mse_plus_commitment", "mse", "dead_codes"],
        "vars": {"eight": list(INCLUDE_4_PLUS_4)},
        "datasets": {"crops": {"label": "crops", "eval_sets": {"heldout": None}}},
        "variants": {
            # a 99% improvement never comes: the plateau rule stops at step 3 (reference at 1, then 2 evaluations)
            "pretrain": {"set": {"train.stop_on_plateau": {"metric": "mse_plus_commitment", "min_rel_improvement": 0.99,
                                                           "patience": 2}}},
            "plain": {"branch_from": branch},
            "switched": {"branch_from": branch,
                         "set": {"convert": {"step": "${branch_step}", "to": "switched", "include": "${eight}", "breadth": 2,
                                             "selector": "lambda_then_conv1x1", "options": {"norm_buffer": 2}}}},
        },
    }
    study.update(changes)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vqvae_study")
    study = _write_study(tmp, _photos(tmp / "photos"))
    out = tmp / "out"
    assert cli.main(["study", str(study), "--out", str(out), "--progress-every", "1000"]) == cli.EXIT_OK
    return out


def test_pretrain_stops_on_its_plateau_and_branches_start_there(finished):
    out = finished
    data = json.loads((out / "study.json").read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert list(runs) == ["crops/pretrain", "crops/plain", "crops/switched"]
    assert all(r["status"] == "done" for r in runs.values())
    pretrain = runs["crops/pretrain"]
    assert pretrain["steps"] == 3 and pretrain["stopped"]["reason"] == "plateau" and pretrain["stopped"]["step"] == 3
    assert any(r["event"] == "plateau" and r["step"] == 3 for r in _log(Path(pretrain["run_dir"])))
    point = out / "branch_points" / "crops" / "pretrain" / "seed0" / "step_00000003"
    parent_files = _files(Path(pretrain["run_dir"]) / "checkpoints" / "step_00000003")
    assert _files(point) == parent_files  # weights, optimizer state, data position, RNG, meta
    for name in ("crops/plain", "crops/switched"):
        run = runs[name]
        assert run["branch_from"] == {"variant": "crops/pretrain", "step": 3, "at": "plateau"}
        assert run["steps"] == 5  # the branch step + more_steps
        run_dir = Path(run["run_dir"])
        assert _files(run_dir / "checkpoints" / "step_00000003") == parent_files  # the same start, bit for bit
        log = _log(run_dir)
        assert log[0]["event"] == "resume" and log[0]["step"] == 3
        assert not any(r["event"] == "plateau" for r in log)  # a branch has no plateau rule of its own
        assert set(run["eval"]) == {"heldout"} and set(METRICS) <= set(run["eval"]["heldout"])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["steps"] == 5 and config["train"].get("stop_on_plateau") is None
    # both branches saw the same batches after the branch point: their first train losses
    # differ only by the conversion, which computes the same function
    plain_first = next(r for r in _log(Path(runs["crops/plain"]["run_dir"])) if r["event"] == "train")
    switched_first = next(r for r in _log(Path(runs["crops/switched"]["run_dir"])) if r["event"] == "train")
    assert plain_first["step"] == switched_first["step"] == 4
    assert switched_first["loss"] == pytest.approx(plain_first["loss"], rel=1e-4)


def test_converting_the_eight_convs_keeps_the_loss_at_the_branch_point(finished):
    run_dir = finished / "runs" / "crops" / "switched" / "seed0"
    conversion = next(r for r in _log(run_dir) if r["event"] == "conversion")
    assert conversion["step"] == 3 and len(conversion["converted"]) == 8
    assert "decoder.upsample2.conv" in conversion["converted"]
    assert conversion["loss_after"] == pytest.approx(conversion["loss_before"], rel=1e-6, abs=1e-7)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["convert"]["step"] == 3  # ${branch_step} filled in when the branch started


def test_results_report_relative_change_and_the_plateau(finished):
    data = json.loads((finished / "study.json").read_text())
    summary = data["summary"]["crops/switched"]["sets"]["heldout"]["mse_plus_commitment"]
    base = data["runs"][1]["eval"]["heldout"]["mse_plus_commitment"]
    value = data["runs"][2]["eval"]["heldout"]["mse_plus_commitment"]
    assert summary["vs_baseline"]["relative"]["mean"] == pytest.approx(value / base - 1)
    results = (finished / "results.md").read_text()
    assert "## heldout" in results and "mse_plus_commitment Δ%" in results and "dead_codes Δ%" in results
    assert "psnr" not in results.split("## heldout")[1].split("\n")[2]  # the study's metrics, in its order
    assert "`crops/pretrain/seed0` stopped on its plateau rule at step 3" in results
    assert "branched from `crops/pretrain` at its plateau step 3" in results
    assert "Lower is better: " in results and "mse_plus_commitment" in results.split("Lower is better: ")[1]


def test_datasets_expand_every_variant_with_its_own_baseline_parents_and_eval_sets(tmp_path):
    photos = _photos(tmp_path / "photos")
    other = _photos(tmp_path / "other", n=4)
    study = _write_study(tmp_path, photos, datasets={
        "a": {"eval_sets": {"a-test": None}},
        "b": {"label": "B", "set": {"data.root": str(other), "data.options.holdout_every": 2},
              "eval_sets": {"b-test": None}}},
        profiles={"p": {"datasets": {"b": {"set": {"train.batch_size": 2}}}}})
    plan = load_study(study, profile="p", out=tmp_path / "out")
    assert [r.key for r in plan.runs] == [f"{d}/{v}/seed0" for d in "ab" for v in ("pretrain", "plain", "switched")]
    switched_b = plan.run("b/switched", 0)
    assert switched_b.dataset == "b" and switched_b.branch_from.variant == "b/pretrain"
    assert switched_b.run_dir == tmp_path / "out" / "runs" / "b" / "switched" / "seed0"
    assert switched_b.config["data"]["root"] == str(other) and switched_b.config["train"]["batch_size"] == 2
    assert plan.run("a/switched", 0).config["train"]["batch_size"] == 4
    assert plan.baseline_of("b/switched") == "b/plain" and plan.eval_sets_of("b/switched") == {"b-test": None}
    assert plan.variants["b/switched"]["label"] == "switched (B)"
    # the branch step is a placeholder until the parent has ended
    assert switched_b.config["convert"]["step"] == "${branch_step}" and switched_b.total_steps is None
    resolved = resolve_branch(switched_b.config, switched_b.branch_from, 17)
    assert resolved["convert"]["step"] == 17 and resolved["train"]["steps"] == 19
    # --only names base variants: their runs on every data set, with parents and baselines
    only = load_study(study, profile="p", out=tmp_path / "out", only=["switched"])
    assert [r.key for r in only.runs] == [f"{d}/{v}/seed0" for d in "ab" for v in ("pretrain", "plain", "switched")]
    # --datasets runs some data sets only: their runs, eval sets and notes, nothing of the others
    only_b = load_study(study, profile="p", out=tmp_path / "out", only=["switched"], datasets=["b"])
    assert [r.key for r in only_b.runs] == [f"b/{v}/seed0" for v in ("pretrain", "plain", "switched")]
    assert list(only_b.datasets) == ["b"] and "a-test" not in only_b.eval_sets and "a/plain" not in only_b.variants
    assert only_b.run("b/switched", 0).config_hash == switched_b.config_hash  # the same runs as in the full study
    for datasets in (["c"], []):
        with pytest.raises(StudyError, match=re.escape("--datasets: expected data sets of ['a', 'b'], got")):
            load_study(study, profile="p", out=tmp_path / "out", datasets=datasets)
    with pytest.raises(StudyError, match="--datasets: only a study with top-level datasets"):
        load_study(_write_study(tmp_path, photos, datasets=None), out=tmp_path / "out", datasets=["a"])


def test_a_variant_limited_to_some_data_sets_runs_only_there(tmp_path):
    photos = _photos(tmp_path / "photos")
    datasets = {"a": {"eval_sets": {"a-test": None}}, "b": {"eval_sets": {"b-test": None}}}
    branch = {"variant": "pretrain", "step": "final", "more_steps": 2}
    convert = {"step": "${branch_step}", "to": "switched", "include": "${eight}", "breadth": 2}
    variants = {"pretrain": {}, "plain": {"branch_from": branch},
                "attempt": {"datasets": ["b"], "branch_from": branch, "set": {"convert": convert}}}
    plan = load_study(_write_study(tmp_path, photos, datasets=datasets, variants=variants), out=tmp_path / "out")
    # (the study file is written with sorted keys: attempt before plain)
    assert [r.key for r in plan.runs] == ["a/pretrain/seed0", "a/plain/seed0",
                                          "b/pretrain/seed0", "b/attempt/seed0", "b/plain/seed0"]
    assert "a/attempt" not in plan.variants and plan.baseline_of("b/attempt") == "b/plain"
    assert plan.run("b/attempt", 0).branch_from.variant == "b/pretrain"
    # the baseline runs everywhere; a parent or control must run wherever its variant does
    bad = [({**variants, "plain": {**variants["plain"], "datasets": ["a"]}}, "variants.plain.datasets", "the baseline runs"),
           ({**variants, "pretrain": {"datasets": ["a"]}}, "variants.attempt.branch_from.variant", "does not run on ['b']"),
           ({**variants, "pretrain": {"datasets": ["b"]}}, "variants.plain.branch_from.variant", "runs only on ['b']"),
           ({**variants, "attempt": {**variants["attempt"], "datasets": ["c"]}}, "variants.attempt.datasets",
            "expected a non-empty list of data sets (of ['a', 'b']), got ['c']")]
    for changed, path, message in bad:
        with pytest.raises(StudyError, match=re.escape(path) + ".*" + re.escape(message)):
            load_study(_write_study(tmp_path, photos, datasets=datasets, variants=changed), out=tmp_path / "out")
    with pytest.raises(StudyError, match=r"variants.attempt.datasets: only a study with top-level datasets"):
        load_study(_write_study(tmp_path, photos, datasets=None, variants=variants), out=tmp_path / "out")


def test_fixed_branch_step_with_more_steps(tmp_path):
    study = _write_study(tmp_path, _photos(tmp_path / "photos"), variants={
        "pretrain": {}, "plain": {"branch_from": {"variant": "pretrain", "step": 4, "more_steps": 3}},
        "switched": {"branch_from": {"variant": "pretrain", "step": 4},
                     "set": {"convert": {"step": "${branch_step}", "to": "switched", "include": "${eight}", "breadth": 2}}}})
    plan = load_study(study, out=tmp_path / "out")
    assert plan.run("crops/plain", 0).total_steps == 7
    switched = plan.run("crops/switched", 0)
    assert switched.total_steps == 30 and switched.config["convert"]["step"] == 4


@pytest.mark.parametrize("variants, path, message", [
    ({"pretrain": {}, "plain": {"branch_from": {"variant": "pretrain", "step": "final"}}},
     "variants.plain.branch_from.more_steps", "needs more_steps"),
    ({"pretrain": {}, "plain": {"branch_from": {"variant": "pretrain", "step": "last", "more_steps": 2}}},
     "variants.plain.branch_from.step", "'final', 'plateau'"),
    ({"pretrain": {}, "plain": {"branch_from": {"variant": "pretrain", "step": "plateau", "more_steps": 2}}},
     "variants.plain.branch_from.step", "needs 'crops/pretrain' to set train.stop_on_plateau"),
    ({"pretrain": {"set": {"train.stop_on_plateau": {"metric": "mse"}}},
      "plain": {"branch_from": {"variant": "pretrain", "step": "final", "more_steps": 2},
                "set": {"train.stop_on_plateau": {"metric": "mse"}}}},
     "variants.plain.set", "must not set train.stop_on_plateau"),
    ({"pretrain": {}, "plain": {"branch_from": {"variant": "pretrain", "step": "final", "more_steps": 2},
                                "set": {"convert": {"step": 5, "include": ["encoder.conv3"]}}}},
     "variants.plain.set", "convert.step must be '${branch_step}'"),
    ({"pretrain": {"set": {"train.stop_on_plateau": {"metric": "l1"}}}, "plain": {}},
     "variants.pretrain (seed 0): train.stop_on_plateau.metric", "expected one of the evaluated metrics"),
])
def test_bad_branches_fail_before_training(tmp_path, capsys, variants, path, message):
    study = _write_study(tmp_path, _photos(tmp_path / "photos"), variants=variants)
    assert cli.main(["study", str(study), "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert path in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_datasets_are_named(tmp_path):
    photos = _photos(tmp_path / "photos")
    with pytest.raises(StudyError, match=r"datasets.a.sets: unknown key"):
        load_study(_write_study(tmp_path, photos, datasets={"a": {"sets": {}}}))
    with pytest.raises(StudyError, match=r"profiles.p.datasets.zz: unknown data set"):
        load_study(_write_study(tmp_path, photos, profiles={"p": {"datasets": {"zz": {}}}}), profile="p")
    with pytest.raises(StudyError, match=r"datasets.b.eval_sets.x: eval set names must be unique"):
        load_study(_write_study(tmp_path, photos, datasets={"a": {"eval_sets": {"x": None}},
                                                            "b": {"eval_sets": {"x": None}}}))


def test_paired_relative_change_is_signed_and_skips_zero_baselines():
    change = paired_relative_change({0: 0.8, 1: 0.9, 2: 5.0}, {0: 1.0, 1: 1.0, 2: 0.0})
    assert change["n"] == 2 and change["seeds"] == [0, 1] and change["mean"] == pytest.approx(-0.15)
    assert change["low"] < -0.15 < change["high"]
    assert paired_relative_change({0: -1.5}, {0: -1.0})["mean"] == pytest.approx(-0.5)  # lower than a negative baseline


# ----------------------------------------------------------------------------- the study file
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_vqvae_study_file(tmp_path, profile):
    """configs/studies/vqvae.yaml checks (every run's config, as dynconv train would), runs each
    data set's branches (a)-(e) from its pretrain, converts exactly INCLUDE_4_PLUS_4, and its
    widened plain VQ-VAE has (b)'s parameter count within 3%."""
    plan = load_study(REPO / "configs" / "studies" / "vqvae.yaml", profile=profile, out=tmp_path / "out")
    assert {r.dataset for r in plan.runs} == {"cifar10", "t91"}
    seeds = {v: [r.seed for r in plan.runs if r.variant == v] for v in plan.variants}
    assert seeds["cifar10/plain"] == seeds["cifar10/switched_lambda"] == seeds["cifar10/pretrain"] == [0, 1, 2]
    assert seeds["t91/condconv"] == seeds["t91/switched_b16_dropout"] == [0]
    for run in plan.runs:
        if run.branch_from is not None:
            parent = "wide_pretrain" if run.variant.endswith("/wide") else "pretrain"
            assert run.branch_from.variant == f"{run.dataset}/{parent}" and run.branch_from.step == "final"
        if run.config.get("convert"):
            assert run.config["convert"]["include"] == list(INCLUDE_4_PLUS_4)
            assert run.config["convert"]["step"] == "${branch_step}"
    options = plan.run("cifar10/pretrain", 0).config["model"]["options"]
    assert options["upsample"] == "nearest" and options["residual_layers"] == 2

    def params(variant: str) -> int:
        config = plan.run(variant, 0).config
        with torch.device("meta"):
            model = build_model("vqvae", **config["model"]["options"])
            if config.get("convert"):
                convert = config["convert"]
                import dynconv

                kwargs = ({"breadth": convert["breadth"], "selector": convert["selector"], **convert.get("options", {})}
                          if convert["to"] == "switched" else {"num_experts": convert["breadth"]})
                assert len(dynconv.convert(model, to=convert["to"], include=convert["include"], **kwargs)) == 8
        return count_parameters(model)

    assert params("cifar10/wide") == pytest.approx(params("cifar10/switched_lambda"), rel=0.03)
    assert params("cifar10/switched_lambda") > 5 * params("cifar10/plain")
    assert math.isclose(params("t91/wide"), params("cifar10/wide"))


def test_the_report_figures_draw_from_a_finished_study(finished, tmp_path):
    """tools/vqvae_figures.py (docs/results/vqvae.md's figures) on the tiny study: loss curves
    per data set, and a row per image with (a)'s reconstruction and the switched run's map."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vqvae_figures", REPO / "tools" / "vqvae_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    study = json.loads((finished / "study.json").read_text())
    curves = figures.loss_curves(study, tmp_path)
    assert Image.open(curves).size == (650, 750)  # one data set: a column of two panels
    images = figures._images_from(finished.parent / "photos", 2)
    assert [tuple(image.shape) for _, image in images] == [(3, 24, 24)] * 2 and 0 <= float(images[0][1].min())
    maps = figures.selector_maps_figure(study, images, "crops", tmp_path, variants={"switched": "switched"})
    assert Image.open(maps).size == (660, 440)  # 2 images x (input, reconstruction, map)


def test_conversion_gradients_tool_shows_the_routing_gradient_leak(finished):
    """tools/conversion_gradients.py on the tiny study's pretrained VQ-VAE: with the selector
    input detached the converted net has the plain net's gradients; with the original rule
    the layers before a switched conv get other gradients."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("conversion_gradients", REPO / "tools" / "conversion_gradients.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    checkpoint = next((finished / "runs" / "crops" / "pretrain" / "seed0" / "checkpoints").glob("step_*"))
    result = tool.compare(checkpoint, list(INCLUDE_4_PLUS_4), breadth=2, selector="conv1x1", batch_size=4, seed=0)
    assert len(result["converted"]) == 8
    assert max(result["detached"].values()) < 1e-4
    assert result["original"]["encoder.conv1.weight"] > 1e-2  # before every switched conv
    assert result["original"]["decoder.upsample2.conv.weight"] < 1e-4  # the last one: nothing leaks into it
