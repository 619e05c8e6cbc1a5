"""Checkpoints: atomic writes (a killed writer leaves the previous checkpoint valid),
keep-last-K + best, RNG round trip, resolution of run / checkpoint paths."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dynconv.train import checkpoint as ckpt


def _save(directory, step, value=0.0):
    model_state = {"w": torch.full((3, 2), float(value)), "flag": torch.tensor(True)}
    state = {"step": step, "rng": [ckpt.rng_state()], "optimizer": {"state": {}, "param_groups": []}}
    return ckpt.save_checkpoint(directory, step, model_state=model_state, state=state, meta={"conversions": []})


def test_save_and_load_round_trip(tmp_path):
    path = _save(tmp_path, 7, value=1.5)
    assert path.name == "step_00000007" and ckpt.is_complete(path)
    weights = ckpt.load_weights(path / ckpt.MODEL_FILE)
    assert torch.equal(weights["w"], torch.full((3, 2), 1.5)) and weights["flag"].item() is True
    assert ckpt.load_state(path)["step"] == 7
    assert ckpt.read_meta(path)["step"] == 7
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_writer_failing_midway_leaves_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 1, value=1.0)

    def broken_save(obj, f, *args, **kwargs):  # the weights are written, then the writer dies
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        _save(tmp_path, 2, value=2.0)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "step_00000002").exists()
    assert torch.equal(ckpt.load_weights(good / ckpt.MODEL_FILE)["w"], torch.ones(3, 2))


def test_killed_writer_process_leaves_previous_checkpoint(tmp_path):
    """A real writer process killed (os._exit) half-way through a checkpoint."""
    script = textwrap.dedent(f"""
        import os, torch
        from dynconv.train import checkpoint as ckpt
        def save(step):
            ckpt.save_checkpoint({str(tmp_path)!r}, step, model_state={{"w": torch.full((4,), float(step))}},
                                 state={{"step": step}}, meta={{}})
        save(1)
        real = ckpt.save_weights
        def dying(state, path, metadata=None):
            real(state, path, metadata)
            os._exit(9)  # killed after the weights, before state and meta
        ckpt.save_weights = dying
        save(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed writer should leave only a hidden temporary directory"
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    assert torch.equal(ckpt.load_weights(latest / ckpt.MODEL_FILE)["w"], torch.ones(4))
    ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 3, value=1.0)
    path = _save(tmp_path, 3, value=5.0)
    assert torch.equal(ckpt.load_weights(path / ckpt.MODEL_FILE)["w"], torch.full((3, 2), 5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


def test_keep_last_and_best(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step)
    ckpt.write_best(tmp_path, tmp_path / "step_00000002", "psnr_y", 30.0, 2)
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_00000001", "step_00000003"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]
    assert ckpt.best_checkpoint(tmp_path).name == "step_00000002"
    assert json.loads((tmp_path / ckpt.BEST_FILE).read_text())["value"] == 30.0
    # a run directory resolves to its best checkpoint, else the latest
    run = tmp_path.parent / (tmp_path.name + "_run")
    (run / "checkpoints").mkdir(parents=True)
    _save(run / "checkpoints", 9)
    assert ckpt.resolve_checkpoint(run).name == "step_00000009"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_00000002"
    assert ckpt.resolve_checkpoint(tmp_path / "step_00000004" / ckpt.MODEL_FILE).name == "step_00000004"
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_nonpersistent_buffers_round_trip():
    from dynconv import SwitchedConv2d

    layer = SwitchedConv2d(2, 2, 3, padding=1, breadth=3)
    layer.recent_usage.copy_(torch.tensor([0.5, 0.25, 0.25]))
    saved = ckpt.nonpersistent_buffers(torch.nn.Sequential(layer))
    fresh = torch.nn.Sequential(SwitchedConv2d(2, 2, 3, padding=1, breadth=3))
    ckpt.load_nonpersistent_buffers(fresh, saved)
    assert torch.equal(fresh[0].recent_usage, layer.recent_usage)
