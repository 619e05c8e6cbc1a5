"""The main job in its --quick setting: four trained SR nets, a table, a self-contained report."""

import json
import math

from dynconv import demo


def test_quick_demo_writes_report_summary_and_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("bicubic", "plain", "switched", "condconv", "involution"):
        assert name in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"bicubic", "plain", "switched", "condconv", "involution"}
    target = summary["target_flops_per_pixel"]
    for name in ("plain", "switched", "condconv", "involution"):
        assert math.isfinite(rows[name]["PSNR-Y"]) and 0 < rows[name]["SSIM-Y"] <= 1
        assert abs(rows[name]["FLOPs/px"] - target) / target < 0.15  # matched FLOPs
        assert (out / name / "config.yaml").is_file() and (out / name / "log.jsonl").is_file()
    html = (out / "report.html").read_text()
    for section in ("Results", "Loss curves", "Sample crops", "Selector maps", "Expert usage"):
        assert section in html
    assert html.count("data:image/png;base64,") >= 8 and "src=\"http" not in html
    switched = next(r for r in summary["results"] if r["name"] == "switched")
    assert switched["routing"] and all(0 <= v["entropy"] <= 1 for v in switched["routing"].values())


def test_demo_arguments_are_checked(capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo.parse_args(["--patch-size", "33"])
    assert "--patch-size must be a multiple of --scale" in capsys.readouterr().err
    settings = demo.parse_args(["--models", "plain", "switched", "--steps", "7"])
    assert settings.models == ["plain", "switched"] and settings.steps == 7
