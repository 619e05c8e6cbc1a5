"""``python -m dynconv.bench switched``: hard-routed switched conv speed and memory.

For each shape (3x3, padding 1, C_in -> C_out), breadth and dtype, times the forward and
forward+backward of ``nn.Conv2d`` (one dense conv: the cost floor; cuDNN on GPU, oneDNN on
CPU) and of ``switched_conv2d`` with the ``reference``, ``gather`` and ``triton`` backends,
and reports each as a ratio to ``nn.Conv2d`` measured in the same run. Times are medians
(CUDA events on GPU, ``perf_counter`` on CPU with the process's intra-op threads) over
rounds that call every method once, so that load changes on a shared machine hit all
methods alike; peak
extra memory is ``torch.cuda.max_memory_allocated`` above the inputs during a
forward+backward (CUDA only: reported as n/a on CPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .common import (
    RESNET18_CIFAR_STAGES,
    add_batch_option,
    add_layout_options,
    add_malloc_option,
    add_shape_set_option,
    environment,
    measure_methods,
    pin_glibc_malloc,
    uses_channels_last,
)

#: ``--shape-set resnet18-cifar``: ResNet-18's CIFAR stages (N128, C64 32x32 .. C512 4x4).
CIFAR_SHAPES: dict[str, tuple[int, int, int, int]] = {f"n{n}c{c}h{hw}": (n, c, c, hw) for _, n, c, hw in RESNET18_CIFAR_STAGES}
# name -> (N, C_in, C_out, H=W)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "n32c64h128": (32, 64, 64, 128),
    "n512c64h32": (512, 64, 64, 32),
    "n512c256h8": (512, 256, 256, 8),
    "n16c128h64": (16, 128, 128, 64),
    "n8c64h64": (8, 64, 64, 64),  # the CPU target shape
    **CIFAR_SHAPES,
}
GPU_SHAPES = ("n32c64h128", "n512c64h32", "n512c256h8", "n16c128h64")
CPU_SHAPES = ("n8c64h64",)
BREADTHS = (1, 2, 8, 32, 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("nn.Conv2d", "reference", "gather", "triton")

# (method, device type, dtype name or None, breadth) -> (max fwd ratio, max fwd+bwd ratio, max memory ratio)
TARGETS = {
    ("triton", "cuda", "bf16", 8): (1.3, 1.5, 1.5),
    ("triton", "cuda", "bf16", 64): (1.3, 2.0, 1.5),
    ("gather", "cpu", None, 8): (None, 2.5, None),
    ("gather", "cpu", None, 64): (None, 3.0, None),
}


@dataclass
class Row:
    shape: str
    breadth: int
    dtype: str
    method: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mib: float | None
    fwd_ratio: float | None = None
    fwd_bwd_ratio: float | None = None
    peak_ratio: float | None = None
    note: str = ""


def available_methods(device: torch.device) -> list[str]:
    from ..ops.dispatch import triton_runs_on
    from ..ops.switched import BACKENDS

    names = ["nn.Conv2d", "reference", "gather"]
    probe = torch.empty(0, device=device)
    if "triton" in BACKENDS and device.type == "cuda" and triton_runs_on(probe):
        names.append("triton")
    return names


def _inputs(shape: tuple[int, int, int, int], breadth: int, dtype: torch.dtype, device: torch.device, cl: bool):
    n, c, o, h = shape
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(n, c, h, h, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    weight = (torch.randn(breadth, o, c, 3, 3, device=device, dtype=dtype) / (3 * c**0.5)).requires_grad_()
    bias = torch.zeros(o, device=device, dtype=dtype, requires_grad=True)
    index = torch.randint(0, breadth, (n, h, h), device=device)
    gate = torch.rand(n, h, h, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, o, h, h, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, weight, bias, index, gate, grad


def run(
    device: torch.device,
    shapes: list[str],
    breadths: list[int],
    dtypes: list[str],
    channels_last: bool,
    methods: list[str],
    reps: int,
    warmup: int,
    batch_divisor: int = 1,
    printer: Callable[[Row], None] | None = None,
    batch: int | None = None,
) -> list[Row]:
    """Measure every (shape, dtype, breadth); within one, all methods are timed interleaved.
    ``batch`` replaces every shape's batch size (then ``batch_divisor`` is ignored)."""
    from ..ops import switched_conv2d

    rows: list[Row] = []
    for shape_name in shapes:
        n, c, o, h = SHAPES[shape_name]
        shape = (batch or max(1, n // batch_divisor), c, o, h)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            conv = nn.Conv2d(c, o, 3, padding=1, device=device, dtype=dtype)
            if channels_last:
                conv = conv.to(memory_format=torch.channels_last)
            for breadth in breadths:
                x, weight, bias, index, gate, grad = _inputs(shape, breadth, dtype, device, channels_last)
                forwards: dict[str, Callable[[], torch.Tensor]] = {}
                leaves: dict[str, list[torch.Tensor]] = {}
                for method in methods:
                    if method == "nn.Conv2d":
                        forwards[method] = lambda: conv(x)  # noqa: E731
                        leaves[method] = [x, *conv.parameters()]
                    else:
                        forwards[method] = lambda m=method: switched_conv2d(x, weight, bias, (index, gate), 1, 1, 1, m)
                        leaves[method] = [x, weight, bias, gate]

                measured = measure_methods(forwards, leaves, device, reps, warmup, grad=lambda y: grad)
                base = "nn.Conv2d"
                for m in methods:
                    got = measured[m]
                    row = Row(shape_name, breadth, dtype_name, m, got.fwd_ms, got.fwd_bwd_ms, got.peak_mib, note=got.note)
                    if m != base:
                        row.fwd_ratio = _ratio(row.fwd_ms, measured[base].fwd_ms)
                        row.fwd_bwd_ratio = _ratio(row.fwd_bwd_ms, measured[base].fwd_bwd_ms)
                        row.peak_ratio = _ratio(row.peak_mib, measured[base].peak_mib)
                    rows.append(row)
                    if printer:
                        printer(row)
                del x, weight, bias, index, gate, grad, forwards, leaves
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _f(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


HEADER = (
    "| shape | b | dtype | method | fwd ms | fwd+bwd ms | peak extra MiB | fwd / conv | fwd+bwd / conv | mem / conv | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: Row) -> str:
    return (
        f"| {r.shape} | {r.breadth} | {r.dtype} | {r.method} | {_f(r.fwd_ms)} | {_f(r.fwd_bwd_ms)} | {_f(r.peak_mib, 1)} "
        f"| {_f(r.fwd_ratio)} | {_f(r.fwd_bwd_ratio)} | {_f(r.peak_ratio)} | {r.note} |"
    )


def target_lines(rows: list[Row], device: torch.device) -> list[str]:
    """The issue's targets, checked against the rows that match them (the switched conv's own
    shapes: the ResNet-18 CIFAR stages are measured for comparison, without targets)."""
    lines = []
    for r in rows:
        if r.shape in CIFAR_SHAPES:
            continue
        for (method, dev, dtype, breadth), limits in TARGETS.items():
            if r.method != method or device.type != dev or r.breadth != breadth or (dtype and r.dtype != dtype):
                continue
            checks = []
            for label, value, limit in zip(("fwd", "fwd+bwd", "mem"), (r.fwd_ratio, r.fwd_bwd_ratio, r.peak_ratio), limits):
                if limit is None:
                    continue
                ok = value is not None and value <= limit
                checks.append(f"{label} {_f(value)}x (target <= {limit}x) {'ok' if ok else 'MISSED'}")
            lines.append(f"- {r.method} {r.shape} b={r.breadth} {r.dtype}: " + "; ".join(checks))
    return lines


def _csv(text: str, allowed, name: str, cast=str) -> list:
    values = [cast(v) for v in text.split(",") if v]
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: expected a comma list of {sorted(allowed)}, got {bad}")
    return values


def build_parser(prog: str = "python -m dynconv.bench switched") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help=f"cuda or cpu (default: {default_device})")
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of {sorted(SHAPES)} (default: {','.join(GPU_SHAPES)} on cuda, {','.join(CPU_SHAPES)} on cpu; "
        f"with --shape-set resnet18-cifar: {','.join(CIFAR_SHAPES)})",
    )
    add_shape_set_option(p)
    p.add_argument("--breadths", default=None, help=f"comma list of expert counts (default: {','.join(map(str, BREADTHS))})")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: bf16,fp32 on cuda, fp32 on cpu)")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)} (default: all available)")
    add_layout_options(p)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 20 cuda, 7 cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default: unchanged)")
    p.add_argument("--quick", action="store_true", help="batch / 16, breadths 1,8, 2 repetitions: a smoke run")
    add_batch_option(p)
    add_malloc_option(p)
    p.add_argument("--json", default=None, help="also write the environment and rows to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dynconv.bench switched``."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    is_cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch: expected a positive batch size, got {args.batch}")
    default_shapes = CIFAR_SHAPES if args.shape_set == "resnet18-cifar" else (GPU_SHAPES if is_cuda else CPU_SHAPES)
    shapes = _csv(args.shapes or ",".join(default_shapes), SHAPES, "shapes")
    breadths = _csv(args.breadths or ("1,8" if args.quick else ",".join(map(str, BREADTHS))), None, "breadths", int)
    dtypes = _csv(args.dtypes or ("bf16,fp32" if is_cuda else "fp32"), DTYPES, "dtypes")
    available = available_methods(device)
    methods = _csv(args.methods, METHODS, "methods") if args.methods else available
    if "nn.Conv2d" not in methods:
        methods = ["nn.Conv2d", *methods]  # the ratios need the baseline
    missing = [m for m in methods if m not in available]
    if missing:
        raise SystemExit(f"--methods: {missing} not available on {device} (available: {available})")
    channels_last = uses_channels_last(device, args)
    reps = args.reps or (2 if args.quick else (20 if is_cuda else 7))
    warmup = 2 if args.quick else 3
    env = environment(device)
    env["malloc"] = pin_glibc_malloc(device, args.default_malloc)
    print(f"# switched conv benchmark (3x3, pad 1): {env}")
    print(f"# channels_last={channels_last} reps={reps} quick={args.quick}; ratios are to nn.Conv2d in this run")
    if not is_cuda:
        print("# peak extra memory: n/a on CPU (only CUDA's allocator statistics are used)")
    print(HEADER)
    rows = run(
        device, shapes, breadths, dtypes, channels_last, methods, reps, warmup,
        batch_divisor=16 if args.quick else 1, printer=lambda r: print(format_row(r), flush=True), batch=args.batch,
    )  # fmt: skip
    lines = target_lines(rows, device)
    if lines:
        print("\ntargets:")
        print("\n".join(lines))
    if args.json:
        payload = {
            "env": env, "channels_last": channels_last, "quick": args.quick, "reps": reps, "batch": args.batch,
            "rows": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
