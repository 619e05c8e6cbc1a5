"""Runs survive what users and schedulers do to them (issue 14, part B): one run per
directory (an OS lock a killed holder releases), SIGTERM saves like Ctrl-C and resumes
exactly, any training error saves the last completed step, bad eval images and bad config /
CLI values fail before any work with one line, 16-bit PNGs keep their range, skipped files
are reported, ``run.json`` records the versions, a killed run's extra log records are marked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynconv import cli
from dynconv.config import ConfigError, config_from_dict, load_config
from dynconv.data import DatasetError, build_dataset
from dynconv.train import Trainer, check_config
from dynconv.train import checkpoint as ckpt
from dynconv.train.lock import RunDirLock, RunDirLockedError
from dynconv.train.logging import read_log

from helpers import assert_same_weights, final_weights, make_sr_data, sr_config, write_config  # noqa: E402


def long_config(root: Path) -> dict:
    """A run far longer than the tests let it go (constant LR, so stopping early with
    --max-steps trains exactly like the same steps of the full schedule); selector dropout
    makes the RNG state matter. Checkpoints every 2 steps."""
    return sr_config(root, train={"steps": 100_000}, schedule={"name": "constant"},
                     model={"name": "sr_switched", "options": {"channels": 4, "num_layers": 3,
                                                              "layer": {"breadth": 3, "norm_buffer": 2, "selector_dropout": 0.3}}},
                     eval={"every": 100_000}, log={"checkpoint_every": 2, "keep_last": 2})


def start_training(config: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dynconv", "train", str(config), "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the training process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------ the lock
def test_run_dir_lock_is_exclusive_and_names_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunDirLock(run) as lock:
        assert lock.held and (run / ".lock").is_file()
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunDirLockedError) as info:
            RunDirLock(run).acquire()  # another open file description: refused, even in-process
        message = str(info.value)
        assert str(run) in message and f"PID {os.getpid()}" in message and holder["started"] in message
        assert isinstance(info.value, RuntimeError)
        with pytest.raises(RunDirLockedError):
            RunDirLock(run).check()
    # released: the lock file stays (with the old holder's record) and blocks nobody
    assert (run / ".lock").is_file()
    RunDirLock(run).check()
    with RunDirLock(run):
        pass


def test_stale_lock_file_of_a_dead_process_never_blocks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999_999_999, "started": "2020-01-01T00:00:00+00:00"}))
    with RunDirLock(run) as lock:
        assert lock.held and json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_lock_of_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    RunDirLock(tmp_path / "new").acquire().release()
    assert not (tmp_path / "new").exists()


def test_trainer_holds_the_lock_until_fit_ends(tmp_path, sr_root):
    config = config_from_dict(sr_config(sr_root, train={"steps": 2}))
    run = tmp_path / "run"
    trainer = Trainer(config, run)
    with pytest.raises(RunDirLockedError, match=f"PID {os.getpid()}"):
        Trainer(config, run)
    trainer.fit()
    with RunDirLock(run):  # released by fit
        pass
    # a trainer that is never fitted releases it when closed or collected
    unfitted = Trainer(config_from_dict(sr_config(sr_root, train={"steps": 4})), run, resume=True)
    with pytest.raises(RunDirLockedError):
        RunDirLock(run).acquire()
    del unfitted
    import gc

    gc.collect()
    with RunDirLock(run):
        pass


def test_second_concurrent_train_is_refused_at_once(tmp_path, sr_root, capsys):
    config = write_config(tmp_path / "c.yaml", sr_config(sr_root, train={"steps": 2}))
    run = tmp_path / "run"
    with RunDirLock(run):  # as a running `dynconv train` holds it
        for argv in (["train", str(config), "--run-dir", str(run)], ["train", str(config), "--resume", str(run)]):
            assert cli.main(argv) == cli.EXIT_ERROR
            err = capsys.readouterr().err
            assert f"PID {os.getpid()}" in err and "in use by another run" in err and "started" in err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (run / "config.yaml").exists() and not (run / "log.jsonl").exists()
        # the Python API refuses it too, before writing anything
        with pytest.raises(RunDirLockedError):
            Trainer(load_config(config), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]


@pytest.mark.parametrize("code", ["EROFS", "EACCES", "ENOSPC"])
def test_unwritable_run_directory_is_one_line(tmp_path, sr_root, capsys, monkeypatch, code):
    """A read-only (or full, or forbidden) run directory fails at its first write, the lock
    file: one line naming the file and the reason, exit 1. (Root ignores chmod, so the OS
    error is simulated.)"""
    import errno as errno_module

    config = write_config(tmp_path / "c.yaml", sr_config(sr_root, train={"steps": 2}))
    run = tmp_path / "run"
    number = getattr(errno_module, code)

    def refuse(self):
        raise OSError(number, os.strerror(number), str(self.path))

    monkeypatch.setattr(RunDirLock, "acquire", refuse)
    assert cli.main(["train", str(config), "--run-dir", str(run)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot write {run / '.lock'}: {os.strerror(number)}" in err


def test_sigkill_of_a_running_train_lets_resume_proceed(tmp_path, sr_root, capsys):
    """A real `python -m dynconv train` killed with SIGKILL after its first checkpoint leaves
    its lock file behind; `--resume` is not blocked by it, and the log records the killed
    process wrote after its last checkpoint are marked as superseded."""
    settings = long_config(sr_root)
    settings["log"]["checkpoint_every"] = 5
    config = write_config(tmp_path / "c.yaml", settings)
    run = tmp_path / "run"
    proc = start_training(config, run)
    try:
        def past_a_checkpoint() -> bool:  # a checkpoint, then at least one more logged step
            steps = [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")]
            if not steps or not (run / "log.jsonl").is_file():
                return False
            logged = [r.get("step") for r in read_log(run) if r.get("event") == "train"]
            return bool(logged) and max(logged) > steps[-1]

        wait_for(past_a_checkpoint, proc, "a checkpoint and a later step")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the stale record stays
    killed_at = max(r["step"] for r in read_log(run) if r.get("event") == "train")
    resumed_from = ckpt.latest_checkpoint(run / "checkpoints")
    start = ckpt.read_meta(resumed_from)["step"]
    assert cli.main(["train", "--resume", str(run), "--max-steps", str(start + 2)]) == 0
    assert "resuming" in capsys.readouterr().out
    raw = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    resume = next(r for r in raw if r["event"] == "resume")
    assert resume["discarded_after"] == start
    train_steps = [r["step"] for r in read_log(run) if r["event"] == "train"]
    assert train_steps == list(range(1, start + 3))  # each step once: the killed run's extra ones dropped
    if killed_at > start:  # almost always; unless the kill landed right after a checkpoint
        assert resume["superseded"] >= killed_at - start
        assert len([r for r in raw if r["event"] == "train"]) > len(train_steps)  # the file keeps every line


# ------------------------------------------------------------------------------- SIGTERM
def test_sigterm_saves_and_resume_is_exact(tmp_path, sr_root, capsys):
    config = write_config(tmp_path / "c.yaml", long_config(sr_root))
    run = tmp_path / "run"
    proc = start_training(config, run)
    try:
        wait_for(lambda: bool(ckpt.list_checkpoints(run / "checkpoints")), proc, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_TERMINATED == 143, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    stopped = ckpt.read_meta(latest)["step"]
    assert ckpt.read_meta(latest)["reason"] == "interrupt" and stopped >= 2
    events = read_log(run)
    assert any(e["event"] == "interrupt" and e.get("signal") == "SIGTERM" and e["step"] == stopped for e in events)
    end = stopped + 3
    assert cli.main(["train", "--resume", str(run), "--max-steps", str(end)]) == 0
    assert cli.main(["train", str(config), "--run-dir", str(tmp_path / "straight"), "--max-steps", str(end)]) == 0
    assert ckpt.latest_checkpoint(run / "checkpoints").name == ckpt.checkpoint_name(end)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run))


# ------------------------------------------------------------------- errors while training
def _register_raising_loss() -> None:
    from dynconv.losses import LOSSES, register_loss

    if "test_raising" in LOSSES:
        return

    @register_loss("test_raising")
    class RaisingLoss(torch.nn.Module):
        """L1 that raises on call ``raise_at`` (a stand-in for any bug or bad input mid-run)."""

        def __init__(self, raise_at: int = -1) -> None:
            super().__init__()
            self.raise_at, self.calls = raise_at, 0

        def forward(self, outputs, batch):
            self.calls += 1
            if self.calls == self.raise_at:
                raise RuntimeError("simulated failure in the loss")
            return (outputs["sr"] - batch["hr"]).abs().mean()


def test_an_error_in_training_saves_the_last_step_and_resume_is_exact(tmp_path, sr_root):
    """The exception propagates after a checkpoint of the last completed step (its data
    position and the RNG state of the failed step's start) is written: resuming gives the
    same weights as a run that never failed."""
    _register_raising_loss()
    model = {"name": "sr_switched", "options": {"channels": 4, "num_layers": 3,
                                                "layer": {"breadth": 3, "norm_buffer": 2, "selector_dropout": 0.3}}}
    raw = sr_config(sr_root, model=model, train={"steps": 5}, losses=[{"name": "test_raising", "options": {"raise_at": 4}}])
    with pytest.raises(RuntimeError, match="simulated failure"):
        Trainer(config_from_dict(raw), tmp_path / "run").fit()
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step_00000003" and ckpt.read_meta(latest)["reason"] == "error"
    assert any(e["event"] == "error" and "simulated failure" in e["error"] for e in read_log(tmp_path / "run"))
    with RunDirLock(tmp_path / "run"):  # released although fit raised
        pass
    raw["losses"] = [{"name": "test_raising"}]
    Trainer(config_from_dict(raw), tmp_path / "run", resume=True).fit()
    Trainer(config_from_dict(raw), tmp_path / "straight").fit()
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "run"))


def test_an_error_in_the_first_step_writes_no_checkpoint(tmp_path, sr_root):
    _register_raising_loss()
    raw = sr_config(sr_root, losses=[{"name": "test_raising", "options": {"raise_at": 1}}])
    with pytest.raises(RuntimeError, match="simulated failure"):
        Trainer(config_from_dict(raw), tmp_path / "run").fit()
    assert not ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")


def test_too_small_eval_image_fails_before_the_first_step(tmp_path, capsys):
    from PIL import Image

    root = make_sr_data(tmp_path / "data", size=16)
    Image.new("RGB", (3, 3), (10, 20, 30)).save(root / "test" / "tiny.png")
    raw = sr_config(root)
    with pytest.raises(DatasetError, match=r"eval image .*tiny\.png is 2x2 .*psnr_y/ssim_y shave 2 pixels"):
        Trainer(config_from_dict(raw), tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", raw)
    assert cli.main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "tiny.png is 2x2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # a training image smaller than the patch is named too (without a cache, from its header)
    Image.new("RGB", (8, 8)).save(root / "train" / "small.png")
    (root / "test" / "tiny.png").unlink()
    raw["data"]["options"]["cache"] = False
    with pytest.raises(DatasetError, match=r"train image .*small\.png is 8x8.*smaller than patch_size=12"):
        Trainer(config_from_dict(raw), tmp_path / "run")


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, path, expected", [
    ("model.options.layer.breadth=0", "model.options.layer.breadth", "breadth must be >= 1, got 0"),
    ("model.options.layer.selektor=lambda", "model.options.layer.selektor", "unknown switched layer option(s) ['selektor']"),
    ("model.options.layer.selector=lamda", "model.options.layer.selector", "got 'lamda'"),
    ("convert={step: 2, selector: lamda}", "convert.selector", "selector must be one of ('conv1x1', 'lambda', 'lambda_then_conv1x1')"),
    ("convert={step: 2, options: {rooting: soft}}", "convert.options.rooting", "unknown switched layer option 'rooting'"),
    ("optim.betas=[0.9", "optim.betas", "malformed YAML"),
    ("train.steps=2.5", "train.steps", "expected an integer, got float 2.5"),
])
def test_config_errors_exit_2_naming_the_key_path(tmp_path, sr_root, capsys, override, path, expected):
    config = write_config(tmp_path / "c.yaml", sr_config(sr_root))
    assert cli.main(["train", str(config), "--set", override, "--run-dir", str(tmp_path / "run")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"config error: {path}: " in err and expected in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_malformed_yaml_file_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: sr_plain\n  options: {channels: 4\ntrain: {steps: 2}\n")
    with pytest.raises(ConfigError, match=r"malformed YAML: .*\(line \d+, column \d+\)"):
        load_config(bad)
    assert cli.main(["train", str(bad)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"config error: {bad}: malformed YAML" in err and len(err.strip().splitlines()) == 1


def test_exponent_numbers_are_numbers(sr_root):
    config = config_from_dict(sr_config(sr_root), ["optim.lr=1e-3", "train.steps=1e3", "optim.weight_decay=5E-4"])
    assert config.optim.lr == 0.001 and config.optim.weight_decay == 0.0005
    assert config.train.steps == 1000 and type(config.train.steps) is int
    check_config(config)


# --------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def switched_run(tmp_path_factory, sr_root) -> Path:
    run = tmp_path_factory.mktemp("switched") / "run"
    Trainer(config_from_dict(sr_config(sr_root, train={"steps": 1})), run).fit()
    return run


@pytest.mark.parametrize("flags, expected", [
    (["--option", "rooting=soft"], ["--option rooting", "'rooting'", "accepted: ['breadth', 'selector'"]),
    (["--selector", "lamda"], ["--selector", "'lamda'", "('conv1x1', 'lambda', 'lambda_then_conv1x1')"]),
    (["--breadth", "0"], ["--breadth", "breadth must be >= 1, got 0"]),
    (["--option", "routing=[soft"], ["--option routing: malformed YAML"]),
    (["--option", "routing"], ["--option must look like key=value"]),
])
def test_convert_rejects_bad_layer_options(tmp_path, switched_run, capsys, flags, expected):
    out = tmp_path / "out"
    assert cli.main(["convert", str(switched_run), "--to", "switched", "-o", str(out), *flags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert all(e in err for e in expected), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_viz_rejects_non_images_and_directories(tmp_path, switched_run, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, expected in ((text, "is not an image file Pillow can read"), (tmp_path, "is a directory"),
                           (tmp_path / "missing.png", "does not exist")):
        assert cli.main(["viz", str(switched_run), str(path), "-o", str(tmp_path / "maps")]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"IMAGE {path} {expected}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "maps").exists()


# ------------------------------------------------------------------------------ images
def _png16(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array.astype(np.uint16)).save(path)
    return path


def test_16_bit_greyscale_png_keeps_its_range(tmp_path):
    from PIL import Image

    from dynconv.data.images import decode_image

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    path = _png16(tmp_path / "ramp16.png", ramp)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # Pillow's 16-bit greyscale mode
    decoded = decode_image(path, str(path))
    assert decoded.dtype == np.uint8 and decoded.shape == (32, 32, 3)
    np.testing.assert_array_equal(decoded[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert (decoded == 255).mean() < 0.01  # was 99.6% white
    image = cli.load_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    torch.testing.assert_close(image[0], torch.from_numpy(ramp / 65535.0).float())
    # and through a dataset
    (tmp_path / "hr").mkdir()
    _png16(tmp_path / "hr" / "a.png", ramp)
    ds = build_dataset("sr_folder", "test", root=tmp_path / "hr")
    assert 0.4 < float(ds[0]["hr"].mean()) < 0.6


def test_skipped_files_are_reported(tmp_path):
    from PIL import Image

    folder = tmp_path / "hr"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (50, 90, 10)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (4, 4)).save(folder / "small.png")
    with pytest.warns(UserWarning) as record:
        ds = build_dataset("sr_folder", "train", root=folder, patch_size=8, on_bad_file="skip")
    messages = [str(w.message) for w in record]
    assert ds.skipped == 2 and len(ds) == 2
    assert any("broken.png" in m and "cannot decode" in m for m in messages)
    assert any("small.png" in m and "smaller than patch_size=8" in m for m in messages)
    assert any("skipped 2 of 4 image file(s)" in m for m in messages)


# ------------------------------------------------------------------------ run records
def test_run_json_records_versions_per_start(tmp_path, sr_root):
    from dynconv import __version__

    raw = sr_config(sr_root, train={"steps": 2})
    Trainer(config_from_dict(raw), tmp_path / "run").fit(max_steps=1)
    Trainer(config_from_dict(raw), tmp_path / "run", resume=True).fit()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["dynconv"] == __version__ and record["torch"] == torch.__version__
    assert [(h["event"], h["step"]) for h in record["history"]] == [("start", 0), ("resume", 1)]
    package = Path(__import__("dynconv").__file__).resolve()
    tracked = subprocess.run(["git", "-C", str(package.parent), "ls-files", "--error-unmatch", str(package)],
                             capture_output=True).returncode == 0
    if tracked:  # imported from a git checkout: its HEAD
        head = subprocess.run(["git", "-C", str(package.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)
    else:
        assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])


def test_resume_marks_the_records_after_its_checkpoint(tmp_path, sr_root):
    """As after a SIGKILL: the log holds steps 3-4 whose checkpoint is gone; the resumed run
    logs them again and read_log keeps only the second history."""
    raw = sr_config(sr_root, train={"steps": 4}, log={"checkpoint_every": 2})
    run = tmp_path / "run"
    Trainer(config_from_dict(raw), run).fit()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000004")
    Trainer(config_from_dict(raw), run, resume=True).fit()
    raw_lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw_lines if r["event"] == "train"] == [1, 2, 3, 4, 3, 4]
    resume = next(r for r in raw_lines if r["event"] == "resume")
    assert resume["discarded_after"] == 2 and resume["superseded"] > 0
    kept = read_log(run)
    assert [r["step"] for r in kept if r["event"] == "train"] == [1, 2, 3, 4]
    assert kept.index(resume) < [i for i, r in enumerate(kept) if r["event"] == "train" and r["step"] == 3][0]
