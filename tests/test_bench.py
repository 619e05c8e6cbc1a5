"""The benchmark drivers run end to end on tiny shapes (speed is never asserted here), and
the shared timing helpers report failures instead of stopping a run."""

import json

import pytest
import torch

from dynconv import bench
from dynconv.bench import common
from dynconv.bench import condconv as bench_condconv
from dynconv.bench import involution as bench_involution


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
        assert {(shape, m) for m in ("nn.Conv2d", "grouped-trick", "reference", "cpu")} <= got
    assert all(r["note"] in ("", "same grouped-conv math as grouped-trick (bias added after the conv)") for r in payload["rows"])
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in payload["rows"])


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
