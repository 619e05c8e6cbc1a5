"""What every benchmark shares: device sync, one timed call, and the environment line
(device, versions, commit) that recorded results must carry."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of ``fn`` in ms: CUDA events on GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cuda": str(torch.version.cuda),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # pragma: no cover - optional dependency
        env["triton"] = "unavailable"
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"
    try:
        root = Path(__file__).resolve().parents[3]
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip() or "unknown"
    except Exception:  # pragma: no cover - no git
        env["commit"] = "unknown"
    return env
