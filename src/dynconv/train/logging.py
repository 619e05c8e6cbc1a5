"""Run logging: a JSONL log, TensorBoard scalars/images and a tqdm progress bar.

Only the main process logs; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import time
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
