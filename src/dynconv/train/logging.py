"""Run logging: a JSONL log, TensorBoard scalars/images and a tqdm progress bar.

Only the main process logs; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------- log.jsonl readers
def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` (a file or a run directory) that describe the run's one
    history: a run killed after its last checkpoint logged steps that the resumed run does
    again, so a ``resume`` record with ``discarded_after: S`` drops the earlier records with
    ``step > S``. The file itself keeps every line (nothing a user owns is rewritten)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    records: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if not isinstance(record, dict):
            continue
        after = record.get("discarded_after") if record.get("event") == "resume" else None
        if isinstance(after, int):
            records = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > after)]
        records.append(record)
    return records


def count_records_after(path: Path, step: int) -> int:
    """How many of the records ``read_log`` keeps have ``step > step`` (what a resume from
    ``step`` supersedes); 0 when there is no log."""
    try:
        return sum(1 for r in read_log(path) if isinstance(r.get("step"), int) and r["step"] > step)
    except OSError:
        return 0


# -------------------------------------------------------------------------------- run.json
def _git_commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout dynconv is imported from; ``(None, None)``
    when it is not tracked in one (an installed package) or git is missing."""
    package = Path(__file__).resolve().parents[1]
    root = next((p for p in package.parents if (p / ".git").exists()), None)
    if root is None:
        return None, None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, env=env)

    try:
        if git("ls-files", "--error-unmatch", "--", str(package / "__init__.py")).returncode != 0:
            return None, None  # e.g. installed into a virtual environment inside some checkout
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment_record() -> dict[str, Any]:
    """Versions and code revision a run was started with (written to ``run.json``)."""
    from .. import __version__

    commit, dirty = _git_commit()
    return {"dynconv": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": commit, "git_dirty": dirty}


def record_run_start(run_dir: str | Path, event: str, step: int) -> dict[str, Any]:
    """Update ``RUN_DIR/run.json``: the versions of this start (top level) and one entry per
    start / resume in ``history``, so a result can be traced to the code that produced it."""
    from .checkpoint import atomic_write_text

    path = Path(run_dir) / "run.json"
    try:
        previous = json.loads(path.read_text())
        history = list(previous.get("history", [])) if isinstance(previous, dict) else []
    except (OSError, ValueError):
        history = []
    env = environment_record()
    entry = {"event": event, "step": step,
             "time": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
             "pid": os.getpid(), "host": socket.gethostname(), "argv": list(sys.argv), **env}
    record = {**env, "history": [*history, entry]}
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


class RunLogger:
    """``log.jsonl`` (one JSON object per line, ``{"event": ..., "step": ..., ...}``),
    TensorBoard under ``tb/`` and a progress bar showing loss, throughput and ETA."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, initial_step: int = 0) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "log.jsonl", "a", buffering=1)
        if self._jsonl.tell() > 0:  # a killed writer may have left half a line: end it
            with open(self.run_dir / "log.jsonl", "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    self._jsonl.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=initial_step or None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, desc="train")

    # -- records ---------------------------------------------------------------------------
    def event(self, event: str, step: int, **fields: Any) -> None:
        if self._jsonl is None:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **_plain(fields)}
        self._jsonl.write(json.dumps(record) + "\n")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: float (3, H, W) in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step)

    def routing(self, step: int, stats: dict[str, dict]) -> None:
        """Per switched layer: normalised routing entropy, expert usage and SwitchNorm usage."""
        if not stats:
            return
        flat = {}
        for layer, s in stats.items():
            name = layer or "layer"
            flat[f"routing/{name}/entropy"] = s["entropy"]
            for e, u in enumerate(s["usage"].tolist()):
                flat[f"routing/{name}/usage/{e}"] = u
            if "switchnorm_usage" in s:
                for e, u in enumerate(s["switchnorm_usage"].tolist()):
                    flat[f"switchnorm/{name}/{e}"] = u
        self.scalars(step, flat)
        self.event("routing", step, layers={
            layer: {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for layer, s in stats.items()
        })

    # -- progress --------------------------------------------------------------------------
    def progress(self, steps: int = 1, **postfix: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
