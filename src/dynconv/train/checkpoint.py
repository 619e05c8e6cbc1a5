"""Checkpoints: safetensors weights + a state file, written atomically; keep last K + best.

Layout of a run directory's ``checkpoints/`` folder::

    step_00000100/            one checkpoint (a directory, renamed into place when complete)
        model.safetensors     the (unwrapped) model's state_dict: parameters and persistent buffers
        ema.safetensors       the weight EMA (only with ``train.ema``)
        state.pt              optimizer / scaler / RNG / step / data position / non-persistent buffers
        config.yaml           the run's config
        meta.json             step, conversion records, metrics, routing statistics and
                              ``files`` (size and sha256 of every other file); written last
    best.json                 {"checkpoint": "step_00000100", "metric": ..., "value": ...}

A checkpoint is written into a hidden temporary directory next to its target and moved into
place with ``os.replace``, so a writer killed half-way leaves the previous checkpoints valid
and no half-written ``step_*`` directory. Readers only consider ``step_*`` directories that
hold a ``meta.json``, and :func:`verify_checkpoint` checks each file against the sizes and
checksums in ``meta.json`` (checkpoints written before that record are read unverified,
with a structural check of the weights and state files). Resume takes the newest intact
checkpoint (:func:`newest_intact_checkpoint`); the other readers name the damaged file.

``dynconv convert`` writes weights-only checkpoints (:func:`save_weights_checkpoint`) that
carry a ``.dynconv-convert`` marker: only such a directory may be replaced (``--overwrite``);
anything else that exists and is not empty is refused, never deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import struct
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
BEST_FILE = "best.json"
CONFIG_FILE = "config.yaml"
CONVERT_MARKER = ".dynconv-convert"
# what a convert output holds: --overwrite replaces a directory holding nothing else
CONVERT_FILES = (MODEL_FILE, META_FILE, CONFIG_FILE, CONVERT_MARKER)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not match the model, or cannot
    be written (the message names the file or directory)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------- tensors
def tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _umask() -> int:
    """The process umask, without changing it where /proc tells it (os.umask only sets)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors_for_safetensors(state), str(path), metadata=metadata)
    # safetensors writes through a private (0600) temporary file: give the file the mode
    # every other file of the checkpoint gets, 0666 less the umask
    os.chmod(path, 0o666 & ~_umask())


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged or unreadable file raises
    :class:`CheckpointError` naming it (not safetensors' own error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is damaged or unreadable ({error}); the checkpoint cannot be used") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, as ``meta.json``'s ``files`` map holds it."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _record_files(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.name: file_record(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE}


def _write_error(error: OSError, what: str, directory: Path, unchanged: str) -> CheckpointError:
    """A one-line error for an OSError while writing (disk full, read-only, no permission)."""
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or -1)
    where = f" at {error.filename}" if error.filename and ".tmp-" not in str(error.filename) else ""
    return CheckpointError(f"cannot write {what} into {directory}: {reason}{f' ({code})' if code else ''}{where}; "
                           f"{unchanged}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file via a temporary file + ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """torch (CPU + CUDA), numpy and python RNG states, as plain tensors/lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------ buffers
def nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers left out of ``state_dict`` (e.g. switched convs' recent usage): kept in the
    state file so a resumed run logs the same routing statistics."""
    out = {}
    for module_name, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None:
                out[f"{module_name}.{name}" if module_name else name] = buf.detach().cpu().clone()
    return out


def load_nonpersistent_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for key, value in buffers.items():
        module_name, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            continue
        buf = module._buffers.get(name)
        if buf is not None and buf.shape == value.shape:
            with torch.no_grad():
                buf.copy_(value)


# --------------------------------------------------------------------------- save / load
def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final``. A non-empty ``final`` (a rename
    cannot replace it) is moved aside first and removed once ``tmp`` is in place, so a
    complete directory exists at every moment; a missing or empty one is replaced directly."""
    old = None
    if final.exists() and any(final.iterdir()):
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    text_files: dict[str, str] | None = None,
) -> Path:
    """Write ``directory/step_XXXXXXXX`` atomically and return its path.

    Files go into a temporary sibling directory first (``text_files``, e.g. the config,
    among them); ``meta.json`` is written last and records the size and sha256 of every
    other file; the directory is then renamed into place. An existing checkpoint of the
    same step is replaced (moved aside, the new one renamed in, the old one deleted).
    An OSError (disk full, read-only or not writable) raises :class:`CheckpointError`
    naming the directory; the previous checkpoints are left as they were.
    """
    directory = Path(directory)
    name = checkpoint_name(step)
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            save_weights(model_state, tmp / MODEL_FILE, metadata={"step": str(step), "format": str(FORMAT_VERSION)})
            if ema_state is not None:
                save_weights(ema_state, tmp / EMA_FILE)
            torch.save(state, tmp / STATE_FILE)
            for file_name, text in (text_files or {}).items():
                (tmp / file_name).write_text(text)
            meta = {"format": FORMAT_VERSION, "step": step, **meta, "files": _record_files(tmp)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            _move_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as error:
        raise _write_error(error, f"checkpoint {name}", directory,
                           "the previous checkpoints are unchanged (free space or fix the permissions, "
                           "then resume with --resume)") from error
    return final


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> None:
    """Refuse to write a weights-only checkpoint over anything the program did not create:
    ``out`` may be missing or an empty directory; with ``overwrite`` it may also be a
    previous ``dynconv convert`` output (it holds the marker and nothing but convert's files)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise CheckpointError(f"-o {out}: exists and is not a directory; choose a new output directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not (out / CONVERT_MARKER).is_file():
        raise CheckpointError(f"-o {out}: exists and is not empty ({len(entries)} entries: {shown}) and is not a "
                              "dynconv convert output; nothing was written. Choose a new or empty output directory")
    if not overwrite:
        raise CheckpointError(f"-o {out}: holds a previous dynconv convert output; pass --overwrite to replace it, "
                              "or choose a new output directory")
    extra = [e for e in entries if e not in CONVERT_FILES]
    if extra:
        raise CheckpointError(f"-o {out}: a previous convert output, but it also holds {extra[:5]} that convert "
                              "did not write; --overwrite replaces only convert's own files. Move them, or choose "
                              "a new output directory")


def save_weights_checkpoint(out: str | Path, *, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                            config_yaml: str | None = None, overwrite: bool = False) -> Path:
    """Write a weights-only checkpoint directory ``out`` (``model.safetensors``, ``meta.json``
    with the files' sizes and checksums, ``config.yaml``, the ``.dynconv-convert`` marker)
    atomically: into a temporary sibling, then renamed into place. ``out`` must be new or
    empty, or (``overwrite``) a previous convert output: see :func:`check_output_dir`."""
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            save_weights(model_state, tmp / MODEL_FILE, metadata={"format": str(FORMAT_VERSION)})
            if config_yaml is not None:
                (tmp / CONFIG_FILE).write_text(config_yaml)
            (tmp / CONVERT_MARKER).write_text(json.dumps(
                {"written_by": "dynconv convert", "files": [MODEL_FILE, META_FILE]
                 + ([CONFIG_FILE] if config_yaml is not None else [])}) + "\n")
            meta = {"format": FORMAT_VERSION, **meta, "files": _record_files(tmp)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
            for f in tmp.iterdir():
                _fsync_file(f)
            check_output_dir(out, overwrite=overwrite)  # again: something may have appeared meanwhile
            _move_into_place(tmp, out)  # replaces a previous convert output (checked above)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as error:
        raise _write_error(error, "the converted checkpoint", out.parent, f"{out} is unchanged") from error
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, path)``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint (not verified: see :func:`newest_intact_checkpoint`)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------- verification
def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: {what}; the checkpoint {path.parent} cannot be used")


def _check_safetensors(path: Path) -> None:
    """Structural check of a safetensors file (header length, header, data size), for
    checkpoints written before meta.json recorded checksums."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _damaged(path, f"{size} bytes, but its header alone claims {n + 8}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise _damaged(path, f"malformed safetensors header ({error})") from None
    if 8 + n + end != size:
        raise _damaged(path, f"{size} bytes, expected {8 + n + end} from its header (truncated?)")


def _check_state_file(path: Path) -> None:
    """Structural check of a ``torch.save`` file (a zip archive: its directory is at the end,
    so a truncated file fails here), for checkpoints without recorded checksums."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise _damaged(path, f"not a readable torch.save archive ({error})") from None


_VERIFIED: dict[tuple, dict[str, Any]] = {}  # (path, file sizes and mtimes) -> meta of an intact checkpoint


def verify_checkpoint(path: str | Path, *, require_state: bool = False) -> dict[str, Any]:
    """Check a checkpoint directory and return its ``meta.json``; raise :class:`CheckpointError`
    naming the damaged file and what is wrong: missing, unreadable or malformed ``meta.json``,
    a missing file, a size or sha256 that differs from the one ``meta.json`` records.
    Checkpoints written before that record are read unverified (a structural check of the
    weights and state files only). ``require_state``: the checkpoint must be resumable."""
    path = Path(path)
    meta_path = path / META_FILE
    try:
        listing = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None
    key = (str(path.resolve()), listing, require_state)
    if key in _VERIFIED:
        return json.loads(json.dumps(_VERIFIED[key]))
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing; the checkpoint {path} is incomplete and cannot be used")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{meta_path} is unreadable or malformed ({error}); the checkpoint {path} "
                              "cannot be used") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is malformed: expected a JSON object, got {type(meta).__name__}; "
                              f"the checkpoint {path} cannot be used")
    files = meta.get("files")
    if files is None:  # written before checkpoints recorded their files: unverified, but readable
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{path / MODEL_FILE} is missing; the checkpoint {path} cannot be used")
        for name in (MODEL_FILE, EMA_FILE):
            if (path / name).is_file():
                _check_safetensors(path / name)
        if (path / STATE_FILE).is_file():
            _check_state_file(path / STATE_FILE)
    else:
        if not isinstance(files, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
                for r in files.values()):
            raise CheckpointError(f"{meta_path} is malformed: 'files' must map file names to "
                                  "{'size': int, 'sha256': str}; the checkpoint cannot be verified")
        for name, record in files.items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing (meta.json records it); the checkpoint {path} cannot be used")
            size = f.stat().st_size
            if size != record["size"]:
                raise _damaged(f, f"{size} bytes, expected {record['size']} (recorded in meta.json)")
            if file_record(f)["sha256"] != record["sha256"]:
                raise _damaged(f, "its sha256 differs from the one recorded in meta.json")
        if MODEL_FILE not in files:
            raise CheckpointError(f"{meta_path} records no {MODEL_FILE}; the checkpoint {path} cannot be used")
    if require_state and not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path / STATE_FILE} is missing: this checkpoint holds weights only and cannot be resumed")
    if len(_VERIFIED) > 64:
        _VERIFIED.clear()
    _VERIFIED[key] = meta
    return json.loads(json.dumps(meta))


def newest_intact_checkpoint(directory: str | Path, *, require_state: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest intact checkpoint or None, [(skipped newer checkpoint, why), ...])`` among the
    ``step_*`` directories of ``directory`` (also those without a meta.json): what resume uses."""
    directory = Path(directory)
    if not directory.is_dir():
        return None, []
    found = sorted((int(m.group(1)), p) for p in directory.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path, require_state=require_state)
        except CheckpointError as error:
            skipped.append((path, str(error)))
            continue
        return path, skipped
    return None, skipped


def read_best(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / BEST_FILE
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not is_complete(Path(directory) / best.get("checkpoint", "")):
        return None
    return best


def best_checkpoint(directory: str | Path) -> Path | None:
    best = read_best(directory)
    return None if best is None else Path(directory) / best["checkpoint"]


def write_best(directory: str | Path, checkpoint: Path, metric: str, value: float, step: int) -> None:
    atomic_write_text(Path(directory) / BEST_FILE,
                      json.dumps({"checkpoint": Path(checkpoint).name, "metric": metric, "value": value, "step": step}))


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never the best one; also stale
    temporary directories of killed writers. Returns the deleted paths."""
    directory = Path(directory)
    best = best_checkpoint(directory)
    found = list_checkpoints(directory)
    deleted = []
    for _, path in found[: max(len(found) - keep_last, 0)]:
        if best is not None and path.resolve() == best.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def remove_stale_temporaries(directory: str | Path) -> None:
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path, *, verify: bool = True) -> Path:
    """A checkpoint directory from: a checkpoint directory, one of its files, a
    ``checkpoints/`` folder or a run directory (best checkpoint if any, else the latest).
    With ``verify`` the chosen checkpoint is checked (:func:`verify_checkpoint`): a damaged
    one raises :class:`CheckpointError` naming the file (and the newest intact checkpoint of
    the folder, to pass explicitly); another checkpoint is never used silently."""
    path = Path(path)
    if path.is_file() and path.name in (MODEL_FILE, META_FILE, STATE_FILE, EMA_FILE):
        path = path.parent
    if path.is_dir() and ((path / META_FILE).is_file() or (path / MODEL_FILE).is_file()):
        if verify:
            verify_checkpoint(path)
        return path
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            best = best_checkpoint(folder)
            chosen = best or latest_checkpoint(folder)
            if chosen is None:
                continue
            if verify:
                try:
                    verify_checkpoint(chosen)
                except CheckpointError as error:
                    intact, _ = newest_intact_checkpoint(folder, require_state=False)
                    which = f" (the best checkpoint, named by {folder / BEST_FILE})" if best is not None else " (the latest)"
                    hint = (f"; the newest intact checkpoint is {intact}: pass it explicitly" if intact is not None
                            else f"; {folder} holds no intact checkpoint")
                    raise CheckpointError(f"{error}{which}{hint}") from None
            return chosen
    raise CheckpointError(
        f"no complete checkpoint at {path} (expected a checkpoint directory with {MODEL_FILE} and {META_FILE}, "
        "or a run directory holding checkpoints/step_*)"
    )


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; unreadable or malformed raises :class:`CheckpointError` naming it."""
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint {path.parent} cannot be used") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable or malformed ({error}); the checkpoint {path.parent} "
                              "cannot be used") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is malformed: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt``; missing, damaged or unreadable raises :class:`CheckpointError`."""
    import pickle

    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint holds weights only and cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is damaged or unreadable ({first}); the checkpoint cannot be resumed") from None
