"""The benchmark drivers run end to end on tiny shapes (speed is never asserted here), and
the shared timing helpers report failures instead of stopping a run."""

import json

import pytest
import torch

from dynconv import bench
from dynconv.bench import common
from dynconv.bench import condconv as bench_condconv
from dynconv.bench import involution as bench_involution
from dynconv.bench import switched as bench_switched


def test_bench_condconv_smoke(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_condconv, "SHAPES", [("tiny dense", 3, 8, 6, 3, 1), ("tiny dw k5", 3, 8, 6, 5, 8)])
    out = tmp_path / "condconv.json"
    assert bench.main(["condconv", "--device", "cpu", "--quick", "--experts", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "grouped-trick / backend" in table
    payload = json.loads(out.read_text())
    assert payload["env"]["malloc"]  # the allocator setting is recorded with the results
    got = {(r["shape"].split(" (quick")[0], r["method"]) for r in payload["rows"]}
    for shape in ("tiny dense", "tiny dw k5"):
        assert {(shape, m) for m in ("nn.Conv2d", "grouped-trick", "reference", "cpu", "experts", "auto")} <= got
    notes = {"", "same grouped-conv math as grouped-trick (bias added after the conv)", "auto -> cpu", "auto -> experts"}
    assert all(r["note"] in notes for r in payload["rows"])
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in payload["rows"])
    assert all(r["runs"] in ("cpu", "experts") for r in payload["rows"] if r["method"] == "auto")
    assert "targets (judged on auto):" in table and "(target <= 1.3)" in table


def test_bench_condconv_resnet18_cifar_set(monkeypatch, tmp_path, capsys):
    """The CIFAR stages, a chosen subset of methods at a given batch: each auto row names
    its choice, and the targets are the CIFAR ones (<= 1.6x from 256 pixels, else <= E x)."""
    monkeypatch.setattr(bench_condconv, "RESNET18_CIFAR_SHAPES", [("S 16x16", 128, 4, 16, 3, 1), ("S 2x2", 128, 48, 2, 3, 1)])
    out = tmp_path / "condconv.json"
    argv = ["condconv", "--device", "cpu", "--quick", "--experts", "4", "--shape-set", "resnet18-cifar", "--batch", "16",
            "--methods", "experts,auto", "--channels-last", "--json", str(out)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["shape_set"] == "resnet18-cifar" and payload["batch"] == 16 and payload["channels_last"]
    assert {(r["shape"], r["method"]) for r in payload["rows"]} == {
        (f"S {s} (batch 16)", m) for s in ("16x16", "2x2") for m in ("nn.Conv2d", "experts", "auto")
    }
    auto = {r["shape"]: r["runs"] for r in payload["rows"] if r["method"] == "auto"}
    assert auto == {"S 16x16 (batch 16)": "cpu", "S 2x2 (batch 16)": "experts"}
    assert "| auto (experts) |" in table
    assert "S 16x16 (batch 16) E=4 fp32, auto (cpu): fwd+bwd / nn.Conv2d" in table and "(target <= 1.6)" in table
    assert "(target <= 4)" in table


def test_bench_condconv_rejects_unknown_methods():
    with pytest.raises(SystemExit, match="--methods"):
        bench.main(["condconv", "--device", "cpu", "--methods", "triton-on-cpu"])


def test_bench_involution_smoke(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_involution, "SHAPES", [("tiny K3 G2", 2, 8, 6, 3, 2)])
    out = tmp_path / "involution.json"
    argv = ["involution", "--device", "cpu", "--quick", "--default-malloc", "--channels-last", "--json", str(out)]
    assert bench.main(argv) == 0
    assert "unfold / backend" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["env"]["malloc"] == "glibc default"
    assert payload["channels_last"] is True  # --channels-last applies on CPU as well
    assert {r["method"] for r in payload["rows"]} >= {"unfold", "reference", "cpu"}


def test_bench_involution_and_switched_at_the_cifar_stages(monkeypatch, tmp_path, capsys):
    """``--shape-set resnet18-cifar`` measures involution (against the 3x3 conv it replaces)
    and the switched conv at ResNet-18's CIFAR stages."""
    monkeypatch.setattr(bench_involution, "RESNET18_CIFAR_SHAPES", [("S 4x4 K3 G2", 128, 32, 4, 3, 2)])
    out = tmp_path / "involution.json"
    argv = ["involution", "--device", "cpu", "--quick", "--batch", "2", "--shape-set", "resnet18-cifar", "--json", str(out)]
    assert bench.main(argv) == 0
    assert "backend / nn.Conv2d 3x3 fwd+bwd" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"nn.Conv2d", "unfold", "cpu"} and {r["shape"] for r in rows} == {"S 4x4 K3 G2 (batch 2)"}

    assert set(bench_switched.CIFAR_SHAPES) == {"n128c64h32", "n128c128h16", "n128c256h8", "n128c512h4"}
    monkeypatch.setattr(bench_switched, "CIFAR_SHAPES", {"n128c512h4": (128, 512, 512, 4)})
    out = tmp_path / "switched.json"
    argv = ["switched", "--device", "cpu", "--quick", "--batch", "1", "--breadths", "8", "--shape-set", "resnet18-cifar",
            "--methods", "gather", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["shape"], r["method"]) for r in rows} == {("n128c512h4", "nn.Conv2d"), ("n128c512h4", "gather")}
    assert "targets:" not in capsys.readouterr().out  # gather b=8 has a target, on the switched conv's own shapes only


def test_measure_methods_reports_a_failing_method_and_goes_on():
    x = torch.randn(4, requires_grad=True)

    def broken():
        raise RuntimeError("unsupported here\nsecond line")

    got = common.measure_methods({"ok": lambda: x * 2, "broken": broken}, {"ok": [x], "broken": [x]}, torch.device("cpu"), 2, 1)
    assert got["ok"].fwd_ms > 0 and got["ok"].fwd_bwd_ms > 0 and got["ok"].note == ""
    assert got["broken"].fwd_ms is None and got["broken"].note == "error: RuntimeError: unsupported here"


def test_measure_methods_clears_grads_each_step():
    """Each timed step starts from ``.grad = None``, as after ``optimizer.zero_grad()``."""
    w = torch.ones(3, requires_grad=True)
    grads_seen = []

    def forward():
        grads_seen.append(w.grad)
        return (w * 3).sum()

    common.measure_methods({"m": forward}, {"m": [w]}, torch.device("cpu"), 3, 2)
    assert len(grads_seen) == 2 * (3 + 2)  # forward-only and forward+backward, warm-up and timed
    assert all(g is None for g in grads_seen[5:])


@pytest.mark.parametrize("keep_default", [True, False])
def test_pin_glibc_malloc_says_what_it_did(keep_default):
    state = common.pin_glibc_malloc(torch.device("cpu"), keep_default)
    if keep_default:
        assert state == "glibc default"
    else:
        assert state.startswith(("pinned", "default ("))
    assert common.pin_glibc_malloc(torch.device("meta"), False) == "default (not a CPU run)"
