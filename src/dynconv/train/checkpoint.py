"""Checkpoints: safetensors weights + a state file, written atomically; keep last K + best.

Layout of a run directory's ``checkpoints/`` folder::

    step_00000100/            one checkpoint (a directory, renamed into place when complete)
        model.safetensors     the (unwrapped) model's state_dict: parameters and persistent buffers
        ema.safetensors       the weight EMA (only with ``train.ema``)
        state.pt              optimizer / scaler / RNG / step / data position / non-persistent buffers
        meta.json             step, conversion records, metrics; written last
    best.json                 {"checkpoint": "step_00000100", "metric": ..., "value": ...}

A checkpoint is written into a hidden temporary directory next to its target and moved into
place with ``os.replace``, so a writer killed half-way leaves the previous checkpoints valid
and no half-written ``step_*`` directory. Readers only consider ``step_*`` directories that
hold a ``meta.json``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
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
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------- tensors
def tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors_for_safetensors(state), str(path), metadata=metadata)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


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
def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/step_XXXXXXXX`` atomically and return its path.

    Files go into a temporary sibling directory first; ``meta.json`` is written last; the
    directory is then renamed into place. An existing checkpoint of the same step is
    replaced (moved aside, the new one renamed in, the old one deleted).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_weights(model_state, tmp / MODEL_FILE, metadata={"step": str(step), "format": str(FORMAT_VERSION)})
        if ema_state is not None:
            save_weights(ema_state, tmp / EMA_FILE)
        torch.save(state, tmp / STATE_FILE)
        meta = {"format": FORMAT_VERSION, "step": step, **meta}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = directory / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_weights_checkpoint(out: str | Path, *, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                            config_yaml: str | None = None) -> Path:
    """Write a weights-only checkpoint directory ``out`` (``model.safetensors``, ``meta.json``,
    ``config.yaml``) atomically: into a temporary sibling, then renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_weights(model_state, tmp / MODEL_FILE, metadata={"format": str(FORMAT_VERSION)})
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2, default=_json_default))
        for f in tmp.iterdir():
            _fsync_file(f)
        old = None
        if out.exists():
            old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from: a checkpoint directory, its ``model.safetensors``, a
    ``checkpoints/`` folder or a run directory (best checkpoint if any, else the latest)."""
    path = Path(path)
    if path.is_file() and path.name in (MODEL_FILE, META_FILE, STATE_FILE):
        path = path.parent
    if path.is_dir() and is_complete(path):
        return path
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            chosen = best_checkpoint(folder) or latest_checkpoint(folder)
            if chosen is not None:
                return chosen
    raise CheckpointError(
        f"no complete checkpoint at {path} (expected a checkpoint directory with {MODEL_FILE} and {META_FILE}, "
        "or a run directory holding checkpoints/step_*)"
    )


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META_FILE).read_text())


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint holds weights only and cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)
