"""The main job in its --quick setting: staged training in miniature (a plain stage, then a
plain control and converted branches from the same checkpoint), a table, a self-contained report."""

import json
import math

import pytest

from dynconv import demo


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_quick_demo_branches_from_one_state_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"bicubic", *(demo.LABELS[n] for n in ("stage1", "plain", "switched", "condconv"))}
    for label, row in rows.items():
        assert label in printed and math.isfinite(row["PSNR-Y"]) and 0 < row["SSIM-Y"] <= 1
    control = rows[demo.LABELS["plain"]]
    assert control["vs control"] == 0.0 and control["steps"] == "4+4"

    results = {r["name"]: r for r in summary["results"]}
    # every branch starts from the stage-1 checkpoint
    for name in ("plain", "switched", "condconv"):
        config = (out / name / "config.yaml").read_text()
        assert summary["branch_point"] in config
    # the conversions keep the function at the branch point; the control is not converted
    assert results["plain"]["conversion"] is None
    for name, to in (("switched", "switched"), ("condconv", "condconv")):
        conversion = results[name]["conversion"]
        assert conversion["to"] == to and len(conversion["converted"]) == 3  # the hidden layers of a 5-layer net
        assert conversion["max_abs_output_change"] < 1e-5
        assert conversion["params_after"] > conversion["params_before"]
    assert results["switched"]["conversion"]["kwargs"]["breadth"] == 8
    # same state and same data order: the first step's loss (before any update) is the same in every branch
    first = {name: _events(out / name, "train")[0] for name in ("plain", "switched", "condconv")}
    assert all(e["step"] == 1 for e in first.values())
    assert first["switched"]["loss"] == pytest.approx(first["plain"]["loss"], rel=1e-5)
    assert first["condconv"]["loss"] == pytest.approx(first["plain"]["loss"], rel=1e-5)
    # switched conv is active at about the plain net's FLOPs per pixel (one expert per pixel)
    assert abs(results["switched"]["flops_per_pixel"] / results["plain"]["flops_per_pixel"] - 1) < 0.15
    routing = results["switched"]["routing"]
    assert routing and all(0 <= v["entropy"] <= 1 for v in routing.values())

    # the story is computed from the measured numbers
    d = rows[demo.LABELS["switched"]]["vs control"]
    sentence = next(line for line in summary["story"] if line.startswith("Switched"))
    if abs(d) < 0.005:
        assert "tied with the plain control" in sentence
    elif d > 0:
        assert f"beat the plain control by {d:.2f} dB" in sentence
    else:
        assert f"did not beat the plain control: {-d:.2f} dB" in sentence
    assert sentence in printed

    html = (out / "report.html").read_text()
    for section in ("What the numbers show", "Results", "Learning curves", "Sample crops", "Selector maps",
                    "right after conversion", "at the end", "Expert usage", "per held-out image"):
        assert section in html, section
    assert html.count("data:image/png;base64,") >= 12 and 'src="http' not in html

    # a rerun into the same folder replaces the demo's runs (fresh logs, no stale branches)
    assert demo.main(["--quick", "--out", str(out), "--branches", "switched"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["results"]] == ["stage1", "plain", "switched"]
    assert not (out / "condconv").exists()
    for name in ("stage1", "plain", "switched"):
        assert len(_events(out / name, "start")) == 1  # a fresh log, not appended to the first run's


def _result(name, psnr, ssim=0.9, params=1000, flops=100.0, per_image=None):
    return demo.RunResult(name=name, steps=10, params=params, flops_per_pixel=flops, train_seconds=1.0, psnr_y=psnr,
                          ssim_y=ssim, per_image=per_image or {"a": {"psnr_y": psnr}, "b": {"psnr_y": psnr}},
                          curve=[], evals=[])


def test_paired_loss_change_covers_the_last_windows():
    control = [(10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0), (50, 2.0), (60, 2.0)]
    branch = [(10, 1.1), (20, 1.0), (30, 2.0), (40, 2.0), (50, 2.0), (60, 1.8)]
    change, steps = demo.paired_loss_change(branch, control)
    assert change == pytest.approx(-0.1) and steps == 10
    assert demo.paired_loss_change([(10, 1.0)], [(20, 1.0)]) is None


def test_verdict_states_what_the_numbers_show():
    s = demo.DemoSettings(plain_steps=100, branch_steps=50, branches=["switched", "condconv"])
    results = {
        "stage1": _result("stage1", 30.0),
        "plain": _result("plain", 30.5),
        "switched": _result("switched", 30.75, params=5000, flops=104.0,
                            per_image={"a": {"psnr_y": 31.0}, "b": {"psnr_y": 30.0}}),
        "condconv": _result("condconv", 30.4),
    }
    lines = demo.verdict(results, 29.0, s)
    assert "30.00 dB PSNR-Y (+1.00 dB over bicubic)" in lines[0] and "(+0.50 dB from the branch point)" in lines[0]
    assert "Switched (converted at the branch point) beat the plain control by 0.25 dB" in lines[1]
    assert "higher PSNR on 1 of 2 held-out photos" in lines[1] and "1.04x" in lines[1] and "5.0x" in lines[1]
    assert "CondConv (converted at the branch point) did not beat the plain control: 0.10 dB" in lines[2]
    assert "training loss" not in lines[1]  # no curves, no paired comparison
    results["switched"].curve = [(5, 1.0), (10, 0.97)]
    results["plain"].curve = [(5, 1.0), (10, 1.0)]
    results["switched"].routing = {"body.0.conv": {"entropy": 0.5}, "body.1.conv": {"entropy": 0.9}}
    line = demo.verdict(results, 29.0, s)[1]
    assert "its training loss over the last 5 steps was 3.0% below the control's." in line  # and it won held-out
    results["switched"].psnr_y = 30.4
    assert "below the control's: it fitted the training crops better without a held-out gain" in demo.verdict(results, 29.0, s)[1]
    assert "routing entropy over the last training steps was 0.50-0.90 per layer" in line
    results["condconv"] = _result("condconv", 30.501)
    assert "tied with the plain control" in demo.verdict(results, 29.0, s)[2]


def test_demo_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--patch-size", "33"])
    assert "--patch-size must be a multiple of --scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--num-layers", "2"])
    assert "--num-layers must be >= 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--branches", "involution"])
    settings = demo.parse_args(["--branches", "switched", "--branch-steps", "7", "--branch-lr", "0.004"])
    assert settings.branches == ["switched"] and settings.branch_steps == 7 and settings.peak_branch_lr == 0.004
    assert settings.convert_section("switched") == {
        "step": 0, "include": ["body.*.conv"], "to": "switched", "breadth": 8, "selector": "conv1x1",
        "options": {"routing": "hard", "norm_buffer": 64},
    }
    assert settings.convert_section("plain") is None
    quick = demo.parse_args(["--quick"])
    assert quick.plain_steps == quick.branch_steps == 4 and quick.branches == ["switched", "condconv"]
