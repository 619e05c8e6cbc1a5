"""Checkpoint reliability (issue 14): convert never deletes what it did not write, checkpoints
record and verify their files, damaged checkpoints give one-line errors naming the file,
resume falls back to the newest intact checkpoint (bitwise exact), viz reports the routing
statistics recorded at save time, file modes follow the umask, write errors are clear."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dynconv import cli
from dynconv.config import config_from_dict
from dynconv.train import Trainer
from dynconv.train import checkpoint as ckpt

from helpers import assert_same_weights, final_weights, sr_config  # noqa: E402


# ------------------------------------------------------------------------------ helpers
def _save(directory, step, value=0.0):
    model_state = {"w": torch.full((3, 2), float(value))}
    state = {"step": step, "rng": [ckpt.rng_state()]}
    return ckpt.save_checkpoint(directory, step, model_state=model_state, state=state, meta={"conversions": []},
                                text_files={ckpt.CONFIG_FILE: "model: {}\n"})


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def break_json(path: Path) -> None:
    path.write_text('{"format": 1, "step": ')


DAMAGE = {
    "model": (ckpt.MODEL_FILE, truncate),
    "state": (ckpt.STATE_FILE, truncate),
    "meta": (ckpt.META_FILE, break_json),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: relative path -> sha256 (or 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(err: str) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _config_file(tmp: Path, raw: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, sr_root) -> Path:
    """A finished 2-step sr_plain run (checkpoints at steps 1 and 2)."""
    tmp = tmp_path_factory.mktemp("plain")
    raw = sr_config(sr_root, model={"name": "sr_plain", "options": {"channels": 4, "num_layers": 3}},
                    train={"steps": 2}, log={"checkpoint_every": 1})
    run = tmp / "run"
    assert cli.main(["train", str(_config_file(tmp, raw)), "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def switched_run(tmp_path_factory, sr_root) -> Path:
    """A finished 4-step sr_switched run, checkpoints at steps 2, 3, 4; best = latest = 4."""
    tmp = tmp_path_factory.mktemp("switched")
    raw = sr_config(sr_root, train={"steps": 4}, log={"checkpoint_every": 1, "keep_last": 3})
    run = tmp / "run"
    assert cli.main(["train", str(_config_file(tmp, raw)), "--run-dir", str(run)]) == 0
    return run


def _image(tmp: Path) -> Path:
    from PIL import Image

    path = tmp / "photo.png"
    Image.new("RGB", (12, 10), (200, 30, 60)).save(path)
    return path


# ------------------------------------------------------------------ 1. convert never deletes
def _convert(source: Path, out: Path, *extra: str) -> int:
    return cli.main(["convert", str(source), "--to", "switched", "--include", "body.*", "--breadth", "2",
                     "-o", str(out), *extra])


def test_convert_refuses_a_non_empty_directory_and_leaves_it_byte_identical(tmp_path, plain_run, capsys):
    v = tmp_path / "v"
    (v / "sub").mkdir(parents=True)
    (v / "thesis.txt").write_text("x\n")
    (v / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = snapshot(v)
    capsys.readouterr()
    assert _convert(plain_run, v) == cli.EXIT_USAGE
    err = one_line_error(capsys.readouterr().err)
    assert f"-o {v}" in err and "not empty" in err and "thesis.txt" in err
    assert snapshot(v) == before
    # --overwrite does not make a directory convert did not write replaceable
    assert _convert(plain_run, v, "--overwrite") == cli.EXIT_USAGE
    assert "not a dynconv convert output" in one_line_error(capsys.readouterr().err)
    assert snapshot(v) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("where", ["run", "inside_run", "checkpoint", "parent"])
def test_convert_refuses_the_source_and_its_run_directory(tmp_path, plain_run, capsys, where):
    source_ckpt = ckpt.latest_checkpoint(plain_run / "checkpoints")
    out = {"run": plain_run, "inside_run": plain_run / "converted", "checkpoint": source_ckpt,
           "parent": plain_run.parent}[where]
    before = snapshot(plain_run)
    capsys.readouterr()
    source = source_ckpt if where == "checkpoint" else plain_run
    assert _convert(source, out) == cli.EXIT_USAGE
    err = one_line_error(capsys.readouterr().err)
    assert "source" in err and str(out) in err
    assert snapshot(plain_run) == before


def test_convert_overwrite_replaces_only_a_previous_convert_output(tmp_path, plain_run, capsys):
    out = tmp_path / "converted"
    assert _convert(plain_run, out) == 0
    assert (out / ckpt.CONVERT_MARKER).is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(ckpt.CONVERT_FILES)
    first = snapshot(out)
    # without --overwrite: refused, unchanged
    capsys.readouterr()
    assert _convert(plain_run, out) == cli.EXIT_USAGE
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert snapshot(out) == first
    # with --overwrite: replaced (another breadth -> other weights and record)
    assert cli.main(["convert", str(plain_run), "--to", "switched", "--include", "body.*", "--breadth", "3",
                     "-o", str(out), "--overwrite"]) == 0
    assert ckpt.read_meta(out)["conversions"][-1]["kwargs"]["breadth"] == 3
    assert snapshot(out) != first and ckpt.verify_checkpoint(out)
    # a convert output that also holds a file of the user's: refused even with --overwrite
    (out / "notes.txt").write_text("mine")
    second = snapshot(out)
    capsys.readouterr()
    assert _convert(plain_run, out, "--overwrite") == cli.EXIT_USAGE
    assert "notes.txt" in one_line_error(capsys.readouterr().err)
    assert snapshot(out) == second
    # an empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert(plain_run, empty) == 0 and ckpt.is_complete(empty)


# ------------------------------------------------------------------ 3. damaged checkpoints
def test_checkpoint_records_its_files_and_verify_names_the_damage(tmp_path):
    path = _save(tmp_path, 1, value=1.0)
    meta = ckpt.read_meta(path)
    assert set(meta["files"]) == {ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.CONFIG_FILE}
    for name, record in meta["files"].items():
        assert record == ckpt.file_record(path / name)
    assert ckpt.verify_checkpoint(path)["step"] == 1
    copy = lambda name: Path(shutil.copytree(path, tmp_path / name))  # noqa: E731
    # truncated weights / state: a size mismatch naming the file
    for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
        damaged = copy(f"trunc_{name}")
        truncate(damaged / name)
        with pytest.raises(ckpt.CheckpointError, match=rf"{damaged / name} is damaged: \d+ bytes, expected \d+"):
            ckpt.verify_checkpoint(damaged)
    # same size, other bytes: a checksum mismatch
    damaged = copy("flipped")
    data = bytearray((damaged / ckpt.MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (damaged / ckpt.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):
        ckpt.verify_checkpoint(damaged)
    # missing file, broken meta.json
    damaged = copy("missing")
    (damaged / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"{damaged / ckpt.STATE_FILE} is missing"):
        ckpt.verify_checkpoint(damaged)
    damaged = copy("meta")
    break_json(damaged / ckpt.META_FILE)
    with pytest.raises(ckpt.CheckpointError, match=rf"{damaged / ckpt.META_FILE} is unreadable or malformed"):
        ckpt.verify_checkpoint(damaged)
    with pytest.raises(ckpt.CheckpointError, match="meta.json is unreadable or malformed"):
        ckpt.read_meta(damaged)


def test_checkpoints_without_a_files_record_stay_readable(tmp_path):
    """Written before meta.json recorded files: unverified but loadable; truncation is still
    caught by a structural check, and the loaders name the file instead of raising their own errors."""
    path = _save(tmp_path, 1, value=2.0)
    meta = ckpt.read_meta(path)
    del meta["files"]
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    assert "files" not in ckpt.verify_checkpoint(path)
    assert torch.equal(ckpt.load_weights(path / ckpt.MODEL_FILE)["w"], torch.full((3, 2), 2.0))
    for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
        damaged = Path(shutil.copytree(path, tmp_path / f"old_{name}"))
        truncate(damaged / name)
        with pytest.raises(ckpt.CheckpointError, match=f"{damaged / name} is damaged"):
            ckpt.verify_checkpoint(damaged)
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path / 'old_model.safetensors' / ckpt.MODEL_FILE} is damaged or unreadable"):
        ckpt.load_weights(tmp_path / "old_model.safetensors" / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path / 'old_state.pt' / ckpt.STATE_FILE} is damaged or unreadable"):
        ckpt.load_state(tmp_path / "old_state.pt")


def test_newest_intact_and_resolve_with_a_damaged_best(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, value=step)
    ckpt.write_best(tmp_path, tmp_path / "step_00000003", "psnr_y", 30.0, 3)
    truncate(tmp_path / "step_00000003" / ckpt.MODEL_FILE)
    (tmp_path / "step_00000004").mkdir()  # no meta.json at all
    intact, skipped = ckpt.newest_intact_checkpoint(tmp_path)
    assert intact.name == "step_00000002"
    assert [p.name for p, _ in skipped] == ["step_00000004", "step_00000003"]
    assert "meta.json is missing" in skipped[0][1] and "model.safetensors is damaged" in skipped[1][1]
    # a reader given the run never uses another checkpoint silently: it names the file and the way out
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_checkpoint(tmp_path)
    message = str(info.value)
    assert "step_00000003/model.safetensors is damaged" in message and "best.json" in message
    assert "the newest intact checkpoint is" in message and "step_00000002" in message and "\n" not in message
    assert ckpt.resolve_checkpoint(tmp_path / "step_00000002").name == "step_00000002"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_cli_readers_name_the_damaged_file(tmp_path, switched_run, capsys, damage):
    run = Path(shutil.copytree(switched_run, tmp_path / "run"))
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest.name == "step_00000004" and ckpt.best_checkpoint(run / "checkpoints") == latest
    name, spoil = DAMAGE[damage]
    spoil(latest / name)
    image = _image(tmp_path)
    commands = {
        "eval": ["eval", str(run)],
        "eval_checkpoint": ["eval", str(latest)],
        "info": ["info", str(run)],
        "info_checkpoint": ["info", str(latest)],
        "viz": ["viz", str(run), str(image), "-o", str(tmp_path / "maps")],
        "convert": ["convert", str(latest), "--to", "condconv", "--include", "head", "-o", str(tmp_path / "conv")],
    }
    capsys.readouterr()
    for label, argv in commands.items():
        assert cli.main(argv) == cli.EXIT_ERROR, label
        err = one_line_error(capsys.readouterr().err)
        assert str(latest / name) in err, (label, err)
    assert not (tmp_path / "conv").exists() and not (run / "metrics.json").read_text() == ""


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_and_is_exact(tmp_path, sr_root, capsys, damage):
    """Steps 1-3 with a checkpoint each, the newest (3) damaged: resume says it skips step 3,
    continues from step 2 and ends with the weights of an undamaged run resumed from step 2."""
    raw = sr_config(sr_root, train={"steps": 4}, log={"checkpoint_every": 1, "keep_last": 3})
    Trainer(config_from_dict(raw), tmp_path / "damaged").fit(max_steps=3)
    reference = Path(shutil.copytree(tmp_path / "damaged", tmp_path / "reference"))
    shutil.rmtree(reference / "checkpoints" / "step_00000003")
    name, spoil = DAMAGE[damage]
    spoil(tmp_path / "damaged" / "checkpoints" / "step_00000003" / name)
    capsys.readouterr()
    trainer = Trainer(config_from_dict(raw), tmp_path / "damaged", resume=True)
    err = capsys.readouterr().err
    assert trainer.step == 2 and trainer.resumed_from.name == "step_00000002"
    assert "skips the damaged checkpoint step_00000003" in err and name in err
    assert trainer.fit().step == 4
    Trainer(config_from_dict(raw), reference, resume=True).fit()
    assert_same_weights(final_weights(tmp_path / "damaged"), final_weights(reference))
    events = [json.loads(line) for line in (tmp_path / "damaged" / "log.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "skipped_checkpoint"]
    assert len(skipped) == 1 and skipped[0]["checkpoint"].endswith("step_00000003") and name in skipped[0]["reason"]
    # the damaged step was written again, intact
    assert ckpt.verify_checkpoint(tmp_path / "damaged" / "checkpoints" / "step_00000003")


def test_resume_without_an_intact_checkpoint_names_them(tmp_path, sr_root):
    raw = sr_config(sr_root, train={"steps": 2})
    Trainer(config_from_dict(raw), tmp_path / "run").fit()
    truncate(tmp_path / "run" / "checkpoints" / "step_00000002" / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint .* skipped step_00000002: .*model.safetensors is damaged"):
        Trainer(config_from_dict(raw), tmp_path / "run", resume=True)


# ------------------------------------------------------------------ 8. routing statistics
def test_viz_reports_the_routing_statistics_recorded_at_save(tmp_path, switched_run, capsys):
    latest = ckpt.latest_checkpoint(switched_run / "checkpoints")
    recorded = ckpt.read_meta(latest)["routing"]
    assert recorded["step"] == 4 and set(recorded["layers"]) == {"body.0.conv"}
    for stats in recorded["layers"].values():
        assert stats["steps"] == 4 and len(stats["usage"]) == 3 and 0.0 <= stats["entropy"] <= 1.0
    # what training logged at step 4 is what the checkpoint recorded
    events = [json.loads(line) for line in (switched_run / "log.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "routing" and e["step"] == 4][-1]["layers"]
    for layer, stats in recorded["layers"].items():
        assert stats["entropy"] == pytest.approx(logged[layer]["entropy"])
    capsys.readouterr()
    assert cli.main(["viz", str(switched_run), str(_image(tmp_path)), "-o", str(tmp_path / "maps")]) == 0
    assert "routing statistics recorded at step 4" in capsys.readouterr().out
    report = json.loads((tmp_path / "maps" / "routing.json").read_text())
    assert report["recorded"] is True and report["recorded_at_step"] == 4 and report["layers"] == recorded["layers"]
    # a converted checkpoint has never trained its new layers: it says so
    converted = tmp_path / "converted"
    plain = Path(shutil.copytree(switched_run, tmp_path / "copy"))
    assert cli.main(["convert", str(plain), "--to", "switched", "--include", "head", "--breadth", "2",
                     "-o", str(converted)]) == 0
    capsys.readouterr()
    assert cli.main(["viz", str(converted), str(_image(tmp_path)), "-o", str(tmp_path / "maps2")]) == 0
    assert "no routing statistics recorded" in capsys.readouterr().out
    report = json.loads((tmp_path / "maps2" / "routing.json").read_text())
    assert report["recorded"] is False and report["layers"] == {} and "records no routing statistics" in report["note"]


# ------------------------------------------------------------------ 10. rough edges
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_checkpoint_file_modes_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        path = _save(tmp_path, 1)
        out = ckpt.save_weights_checkpoint(tmp_path / "weights", model_state={"w": torch.zeros(2)}, meta={})
    finally:
        os.umask(previous)
    expected = 0o666 & ~mask
    for f in [*path.iterdir(), *out.iterdir()]:
        assert f.stat().st_mode & 0o777 == expected, (f.name, oct(f.stat().st_mode & 0o777))


def test_disk_full_names_the_directory_and_keeps_old_checkpoints(tmp_path, monkeypatch):
    import safetensors.torch

    good = _save(tmp_path, 1, value=1.0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(tmp_path, 2, value=2.0)
    message = str(info.value)
    assert f"into {tmp_path}" in message and "No space left on device (ENOSPC)" in message and "\n" not in message
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    assert ckpt.verify_checkpoint(good) and ckpt.latest_checkpoint(tmp_path) == good


def _make_read_only(path: Path) -> bool:
    path.chmod(0o555)
    if os.access(path, os.W_OK):  # root: permissions do not stop writes
        path.chmod(0o755)
        return False
    return True


def test_read_only_checkpoints_directory_fails_clearly(tmp_path, sr_root, capsys):
    raw = sr_config(sr_root, train={"steps": 3})
    config = _config_file(tmp_path, raw)
    run = tmp_path / "run"
    assert cli.main(["train", str(config), "--run-dir", str(run), "--max-steps", "1"]) == 0
    folder = run / "checkpoints"
    before = snapshot(folder)
    if not _make_read_only(folder):
        pytest.skip("running as root: a read-only directory is still writable")
    try:
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(run)]) == cli.EXIT_ERROR
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"into {folder}" in err and "Permission denied (EACCES)" in err
    finally:
        folder.chmod(0o755)
    assert snapshot(folder) == before
    assert cli.main(["train", "--resume", str(run)]) == 0  # writable again: resumes


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_checkpoint_write_errors_during_training_are_one_line(tmp_path, plain_run, capsys, monkeypatch, code):
    """A read-only file system or a full disk while a run saves: exit 1, one line naming the
    checkpoints directory, the earlier checkpoints unchanged (works as root, unlike chmod)."""
    run = Path(shutil.copytree(plain_run, tmp_path / "run"))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["train"]["steps"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    before = snapshot(run / "checkpoints")

    def failing(obj, f, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(f))

    monkeypatch.setattr(ckpt.torch, "save", failing)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert f"into {run / 'checkpoints'}" in err and f"({errno.errorcode[code]})" in err and "unchanged" in err
    assert snapshot(run / "checkpoints") == before


def test_resuming_a_finished_run_names_its_checkpoint(tmp_path, plain_run, capsys):
    run = Path(shutil.copytree(plain_run, tmp_path / "run"))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "nothing to do" in out and str(run / "checkpoints" / "step_00000002") in out
