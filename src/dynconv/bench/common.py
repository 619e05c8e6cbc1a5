"""What every benchmark shares: device sync, one timed call, and the environment line
(device, versions, commit) that recorded results must carry."""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch


#: ResNet-18's CIFAR-10 stages at batch 128, 3x3 convs (issue 12): ``(name, N, C, H = W)``.
#: Every stage does the same FLOPs; per-example kernels (CondConv) get costlier as the maps
#: shrink. Each benchmark measures its op at these shapes with ``--shape-set resnet18-cifar``.
RESNET18_CIFAR_STAGES: list[tuple[str, int, int, int]] = [
    ("N128 C64 32x32", 128, 64, 32),
    ("N128 C128 16x16", 128, 128, 16),
    ("N128 C256 8x8", 128, 256, 8),
    ("N128 C512 4x4", 128, 512, 4),
]
#: The ``--shape-set`` names every benchmark accepts.
SHAPE_SETS = ("default", "resnet18-cifar")


def add_shape_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape-set", choices=SHAPE_SETS, default="default",
        help="default: the benchmark's own shapes; resnet18-cifar: ResNet-18's CIFAR stages (N128, C64 32x32 .. C512 4x4)",
    )


def add_batch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch", type=int, default=None,
        help="run every shape at this batch size instead (e.g. a small one: a smoke run)",
    )


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


#: glibc ``mallopt`` parameters (malloc.h) and the values the CPU benchmarks set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLDS = (2**30, 32 * 2**20)  # older glibc refuses more than 32 MiB
_TRIM_THRESHOLD = 2**31 - 1


def add_layout_options(parser: argparse.ArgumentParser) -> None:
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--no-channels-last", action="store_true", help="NCHW inputs (default: channels_last on cuda, NCHW on cpu)")
    layout.add_argument("--channels-last", action="store_true", help="channels_last inputs on cpu too")


def uses_channels_last(device: torch.device, args: argparse.Namespace) -> bool:
    """The input layout :func:`add_layout_options` asked for on ``device``."""
    return (device.type == "cuda" or args.channels_last) and not args.no_channels_last


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU runs: keep glibc's default malloc thresholds (default: pin them, see docs/performance.md)",
    )


def pin_glibc_malloc(device: torch.device, keep_default: bool) -> str:
    """For CPU runs, stop glibc from handing freed buffers back to the OS between calls
    (``mallopt``: mmap threshold 1 GiB, or 32 MiB where glibc refuses that, trim threshold
    2 GiB); returns what the run used.

    Why: with glibc's defaults (a dynamic mmap threshold, trimming the heap top) every fresh
    multi-MiB buffer can be page-faulted in anew on each call, and which calls pay depends on
    the process's allocation history: an NCHW depthwise conv measured 22 ms or 4.5 ms that way
    on the 2-vCPU VM. Pinned, the times measure the ops; ``--default-malloc`` measures what a
    process with the defaults sees."""
    if device.type != "cpu":
        return "default (not a CPU run)"
    if keep_default:
        return "glibc default"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap = next((t for t in _MMAP_THRESHOLDS if libc.mallopt(_M_MMAP_THRESHOLD, t) == 1), None)
        trim = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc
        return "default (no glibc mallopt)"
    if mmap is None or not trim:
        return "default (mallopt refused)"
    return f"pinned (mallopt mmap threshold {mmap >> 20} MiB, trim threshold 2 GiB)"


def describe_error(exc: Exception) -> str:
    """A one-line note for a method that failed (OOM, an unsupported dtype)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int
) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms per function, timing them round-robin (one call each per round) so that a
    noisy machine (a shared CPU) slows all methods alike and the ratios stay meaningful.
    A function that fails (OOM, unsupported dtype) is dropped and its error returned."""
    errors: dict[str, str] = {}
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
            sync(device)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            errors[name] = describe_error(exc)
            del live[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            times[name].append(timed_ms(fn, device))
    return {name: statistics.median(v) for name, v in times.items()}, errors


def peak_extra_mib(step: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory above what is allocated before one call of ``step`` (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class Measured(NamedTuple):
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mib: float | None
    note: str


def measure_methods(
    forwards: dict[str, Callable[[], torch.Tensor]],
    leaves: dict[str, list[torch.Tensor]],
    device: torch.device,
    reps: int,
    warmup: int,
    grad: Callable[[torch.Tensor], torch.Tensor] = torch.ones_like,
) -> dict[str, Measured]:
    """Forward (no grad) and forward+backward medians of every method, timed interleaved
    (:func:`interleaved_medians`), and the CUDA peak memory of one forward+backward. Each
    step clears the leaves' ``.grad`` first, as ``optimizer.zero_grad()`` does."""

    def no_grad(f):
        def call():
            with torch.no_grad():
                return f()

        return call

    def step(method):
        def call():
            for t in leaves[method]:
                t.grad = None
            y = forwards[method]()
            y.backward(grad(y))

        return call

    fwd, fwd_err = interleaved_medians({m: no_grad(f) for m, f in forwards.items()}, device, reps, warmup)
    fb, fb_err = interleaved_medians({m: step(m) for m in forwards if m not in fwd_err}, device, reps, warmup)
    peaks: dict[str, float | None] = {}
    for m in forwards:
        if m in fwd and m in fb:
            for ts in leaves.values():  # no gradients held from earlier steps in the baseline
                for t in ts:
                    t.grad = None
            try:
                peaks[m] = peak_extra_mib(step(m), device)
            except Exception as exc:  # noqa: BLE001
                fb_err[m] = describe_error(exc)
    return {
        m: Measured(fwd.get(m), fb.get(m), peaks.get(m), fwd_err.get(m) or fb_err.get(m, "")) for m in forwards
    }


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
