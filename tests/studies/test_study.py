"""``dynconv study``: a tiny study end to end (2 variants x 2 seeds, one a staged branch, two
eval sets), a rerun skips finished runs, an interrupted run resumes to the same metrics, bad
study files fail before any training with the key path, ``eval --eval-set`` on odd-size,
grayscale and RGBA images, and the statistics of the results table."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dynconv import cli
from dynconv.studies import load_study
from dynconv.studies.results import paired_difference, summarise

from helpers import make_sr_data, sr_config  # noqa: E402  (tests/ is on sys.path under pytest)


def _write_study(tmp: Path, data_root: Path, second_set: Path, **changes) -> Path:
    cfg = sr_config(data_root)
    cfg["model"] = {"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}}
    cfg["train"]["steps"] = 6
    cfg["log"]["checkpoint_every"] = 3
    (tmp / "base.yaml").write_text(yaml.safe_dump(cfg))
    study = {
        "base": "base.yaml", "baseline": "plain", "seeds": [0, 1],
        "eval_sets": {"A": "test", "B": str(second_set)},
        "variants": {
            "plain": {},
            "staged": {"set": {"convert": {"step": 3, "to": "switched", "include": ["body.*.conv"], "breadth": 3,
                                           "options": {"norm_buffer": 2}}},
                       "branch_from": {"variant": "plain", "step": 3}},
        },
        "profiles": {"tiny": {"set": {"train.steps": 6}}},
    }
    study.update(changes)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_sr_data(tmp_path_factory.mktemp("sr"))
    second = make_sr_data(tmp_path_factory.mktemp("sr2"), train=1, test=3, size=20) / "test"
    return root, second


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("study")
    study = _write_study(tmp, *data)
    out = tmp / "out"
    code = cli.main(["study", str(study), "--profile", "tiny", "--out", str(out), "--progress-every", "1000"])
    assert code == cli.EXIT_OK
    return study, out


def _metrics(out: Path) -> dict:
    data = json.loads((out / "study.json").read_text())
    return {(r["variant"], r["seed"]): r["eval"] for r in data["runs"] if r["status"] == "done"}


def test_study_end_to_end(finished_study):
    _, out = finished_study
    data = json.loads((out / "study.json").read_text())
    assert [(r["variant"], r["seed"], r["status"]) for r in data["runs"]] == [
        ("plain", 0, "done"), ("plain", 1, "done"), ("staged", 0, "done"), ("staged", 1, "done")]
    for run in data["runs"]:
        assert set(run["eval"]) == {"A", "B"}
        assert run["eval"]["A"] != run["eval"]["B"]  # each set scored on its own images
        assert run["params"] > 0 and run["flops_per_pixel"] > 0 and run["train_seconds"] > 0
        assert len(run["config_hash"]) == 16
        run_dir = Path(run["run_dir"])
        assert (run_dir / "eval" / "A.json").is_file() and (run_dir / "eval" / "B.json").is_file()
        assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir()  # an ordinary run directory
    staged = next(r for r in data["runs"] if r["variant"] == "staged")
    assert staged["params"] > data["runs"][0]["params"]  # converted: every expert stored
    assert staged["branch_from"] == {"variant": "plain", "step": 3}
    assert {"torch", "commit", "device", "dynconv"} <= set(data["environment"])
    summary = data["summary"]["staged"]["sets"]["A"]["psnr_y"]
    assert summary["n"] == 2 and summary["vs_baseline"]["n"] == 2
    # the branch shares the parent's first 3 steps: its first log record resumes at step 3
    log = [json.loads(line) for line in (Path(staged["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "resume" and log[0]["step"] == 3
    assert any(r["event"] == "conversion" and r["step"] == 3 for r in log)
    results = (out / "results.md").read_text()
    assert "## A" in results and "## B" in results and "±" in results and "(n=2)" in results
    report = (out / "report.html").read_text()
    assert "Selector maps" in report and "data:image/png;base64," in report and "<img src=\"http" not in report


def test_rerun_skips_finished_runs(finished_study, capsys):
    study, out = finished_study
    before = _metrics(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/checkpoints/step_*/model.safetensors")}
    assert cli.main(["study", str(study), "--profile", "tiny", "--out", str(out)]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4
    assert _metrics(out) == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_interrupted_run_resumes_to_the_same_metrics(finished_study, tmp_path, data):
    """A run killed after its step-3 checkpoint (its status still 'running') resumes there and
    ends with the metrics of the uninterrupted study."""
    _, reference = finished_study
    study = _write_study(tmp_path, *data)
    out = tmp_path / "out"
    plan = load_study(study, profile="tiny", out=out, only=["plain"], seeds=[0])
    run = plan.runs[0]
    config = json.loads(json.dumps(run.config))
    config["log"]["progress"] = False
    config_file = tmp_path / "interrupted.yaml"
    config_file.write_text(yaml.safe_dump(config))
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "study_run.json").write_text(json.dumps({"status": "running", "config_hash": run.config_hash}))
    assert cli.main(["train", str(config_file), "--run-dir", str(run.run_dir), "--max-steps", "3"]) == cli.EXIT_OK
    assert [p.name for p in (run.run_dir / "checkpoints").glob("step_*")] == ["step_00000003"]
    assert cli.main(["study", str(study), "--profile", "tiny", "--out", str(out), "--only", "plain", "--seeds", "0"]) == 0
    log = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r["event"] in ("start", "resume")] == ["start", "resume"]
    assert _metrics(out)[("plain", 0)] == _metrics(reference)[("plain", 0)]


def test_failed_run_is_reported_and_the_others_go_on(tmp_path, data, capsys):
    study = _write_study(tmp_path, *data, seeds=[0], variants={
        "plain": {}, "broken": {"set": {"optim.lr": 1.0e30}}, "other": {"set": {"train.steps": 4}}})
    out = tmp_path / "out"
    assert cli.main(["study", str(study), "--profile", "tiny", "--out", str(out)]) == cli.EXIT_ERROR
    status = {r["variant"]: r["status"] for r in json.loads((out / "study.json").read_text())["runs"]}
    assert status == {"plain": "done", "broken": "failed", "other": "done"}
    assert "1 run(s) failed: broken/seed0" in capsys.readouterr().err


@pytest.mark.parametrize("change, path", [
    ({"variants": {"plain": {}, "x": {"sett": {}}}}, "variants.x.sett"),
    ({"base": "missing.yaml"}, "base"),
    ({"baseline": "nope"}, "baseline"),
    ({"eval_sets": {"A": "no/such/folder"}}, "eval_sets.A"),
    ({"variants": {"plain": {}, "x": {"set": {"model.name": "sr_nope"}}}}, "variants.x"),
    ({"variants": {"plain": {}, "x": {"set": {"model.options.chanels": 3}}}}, "model.options.chanels"),
    ({"variants": {"plain": {}, "x": {"branch_from": {"variant": "y", "step": 3}}}}, "variants.x.branch_from.variant"),
    ({"variants": {"plain": {}, "x": {"set": {"convert.step": "${nope}"}}}}, "variants.x.set.convert.step"),
])
def test_bad_study_file_fails_before_training(tmp_path, data, capsys, change, path):
    study = _write_study(tmp_path, *data, **change)
    out = tmp_path / "out"
    assert cli.main(["study", str(study), "--profile", "tiny", "--out", str(out)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert path in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_profile_and_only(tmp_path, data, capsys):
    study = _write_study(tmp_path, *data)
    assert cli.main(["study", str(study), "--profile", "gpu", "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "--profile: unknown profile 'gpu'" in capsys.readouterr().err
    assert cli.main(["study", str(study), "--only", "swiched", "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "--only: unknown variant 'swiched'" in capsys.readouterr().err


def test_dry_run_lists_runs_in_order(tmp_path, data, capsys):
    study = _write_study(tmp_path, *data)
    assert cli.main(["study", str(study), "--profile", "tiny", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [line.split(":")[0] for line in lines] == ["plain/seed0", "plain/seed1", "staged/seed0", "staged/seed1"]
    assert "branch of plain at step 3" in lines[2]


def test_eval_set_on_odd_grayscale_and_rgba_images(finished_study, tmp_path, capsys):
    _, out = finished_study
    run_dir = out / "runs" / "plain" / "seed0"
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)).save(folder / "odd.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (18, 22, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    before = (run_dir / "eval" / "A.json").read_text()
    assert cli.main(["eval", str(run_dir), "--eval-set", f"mixed={folder}"]) == cli.EXIT_OK
    result = json.loads((run_dir / "eval" / "mixed.json").read_text())
    assert result["eval_set"] == "mixed" and all(math.isfinite(v) for v in result["metrics"].values())
    assert (run_dir / "eval" / "A.json").read_text() == before  # one set never overwrites another
    assert "mixed" in capsys.readouterr().out
    assert cli.main(["eval", str(run_dir), "--eval-set", f"x={tmp_path / 'none'}"]) == cli.EXIT_USAGE
    assert cli.main(["eval", str(run_dir), "--eval-set", "nofolder"]) == cli.EXIT_USAGE


def test_statistics_of_the_results_table():
    stats = summarise([1.0, 2.0, 3.0])
    assert stats == {"n": 3, "mean": 2.0, "std": 1.0}
    diff = paired_difference({0: 2.0, 1: 3.0, 2: 4.0, 3: 9.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert diff["n"] == 3 and diff["seeds"] == [0, 1, 2] and diff["mean"] == pytest.approx(2.0)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert diff["low"] == pytest.approx(2.0 - half) and diff["high"] == pytest.approx(2.0 + half)
    single = paired_difference({0: 2.0}, {0: 1.5})
    assert single["mean"] == 0.5 and math.isnan(single["low"])


def test_python_m_dynconv_study_help():
    done = subprocess.run([sys.executable, "-m", "dynconv", "study", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "examples:" in done.stdout and "--profile" in done.stdout


def test_wallclock_matched_run_keeps_its_schedule_shape(tmp_path, data):
    """A ``match_wallclock`` run is timed on a probe, trains the steps that fit the matched
    run's wall-clock, and warms up for the same fraction of them as the planned schedule."""
    study = _write_study(tmp_path, *data, seeds=[0], variants={
        "plain": {},
        "matched": {"set": {"model.options.channels": 6}, "match_wallclock": {"variant": "plain", "probe_steps": 5}},
    })
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["schedule"] = {"name": "cosine", "warmup_steps": 3}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "out"
    assert cli.main(["study", str(study), "--profile", "tiny", "--out", str(out), "--progress-every", "1000"]) == cli.EXIT_OK
    status = json.loads((out / "runs" / "matched" / "seed0" / "study_run.json").read_text())
    match = status["wallclock_match"]
    assert match["variant"] == "plain" and match["steps"] >= 1 and match["probe_seconds_per_step"] > 0
    config = yaml.safe_load((out / "runs" / "matched" / "seed0" / "config.yaml").read_text())
    assert config["train"]["steps"] == match["steps"] == status["steps"]
    assert config["schedule"]["warmup_steps"] == int(3 * match["steps"] / 6)  # planned: 3 of 6 steps
    assert not (out / "probes" / "matched-seed0").exists()
