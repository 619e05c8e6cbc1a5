"""How fast a run trains and infers: :func:`training_speed` (seconds per step and per epoch,
peak memory, from its log) and :func:`forward_latency` (an inference forward of a checkpoint at
a given batch size, timed on the device it trained on). A study records both per run, so its
table can quote seconds per epoch and forward milliseconds measured on one machine.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .experiment import load_checkpoint_model, model_cost, to_channels_last, use_cpu

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def training_speed(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """From a run's ``log.jsonl`` records: ``seconds_per_step`` (the median of the train records'
    ``step_seconds``, the training step alone: no evaluation, saving or logging; the median
    leaves out the first window's warm-up), ``steps_per_epoch``, ``seconds_per_epoch`` (their
    product), ``peak_memory_mib`` (CUDA runs, else None) and ``device``. Values a log does not
    hold (a run logged by an older version) are None."""
    records = list(records)
    step_seconds = [r["step_seconds"] for r in records
                    if r.get("event") == "train" and isinstance(r.get("step_seconds"), (int, float))]
    starts = [r for r in records if r.get("event") in ("start", "resume")]
    steps_per_epoch = next((r["steps_per_epoch"] for r in reversed(starts) if r.get("steps_per_epoch")), None)
    device = next((r["device"] for r in reversed(starts) if r.get("device")), None)
    peaks = [r["peak_memory_mib"] for r in records if isinstance(r.get("peak_memory_mib"), (int, float))]
    per_step = statistics.median(step_seconds) if step_seconds else None
    return {"seconds_per_step": per_step, "steps_per_epoch": steps_per_epoch,
            "seconds_per_epoch": per_step * steps_per_epoch if per_step is not None and steps_per_epoch else None,
            "peak_memory_mib": max(peaks) if peaks else None, "device": device}


def device_name(device: torch.device) -> str:
    """``NVIDIA H200`` or ``x86_64 (2 threads)``: what a timing was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def forward_latency(checkpoint: str | Path, *, batch_size: int = 64, warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """The median wall-clock of one inference forward (``torch.inference_mode``) of a
    checkpoint's model on ``batch_size`` random normal inputs of the size its costs are quoted
    for (:func:`~dynconv.train.experiment.default_input_size`), in the run's precision
    (autocast) and memory format, on the device it trained on (``train.device``).

    Returns ``{"ms", "min_ms", "batch_size", "input_size", "device", "device_name", "precision",
    "channels_last", "repeats", "peak_memory_mib"}``; the peak (allocated tensors during the
    timed forwards, weights and input included) is measured on CUDA only, else None.
    """
    for name, value, minimum in (("batch_size", batch_size, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    model, config, _ = load_checkpoint_model(checkpoint)
    model.eval()
    input_size = model_cost(model, config)["input_size"]
    device = torch.device("cpu" if use_cpu(config) else "cuda")
    model.to(device)
    x = torch.randn(batch_size, *input_size, device=device)
    if config.train.channels_last:
        to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _AUTOCAST.get(config.train.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "batch_size": batch_size,
            "input_size": list(input_size), "device": str(device), "device_name": device_name(device),
            "precision": config.train.precision, "channels_last": config.train.channels_last, "repeats": repeats,
            "peak_memory_mib": peak}
