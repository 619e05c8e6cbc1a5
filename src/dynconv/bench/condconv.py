"""``python -m dynconv.bench condconv``: CondConv / Dynamic Convolution speed.

Compares, per shape and expert count: ``nn.Conv2d`` (a plain conv, the cost floor),
the grouped-conv trick (timm's ``CondConv2d``: batch folded into conv groups, mixed bias
passed to the conv), dynconv's ``reference`` backend (the same grouped-conv math with the
bias added afterwards), and the fast backends usable on the device (``triton`` on CUDA,
``cpu`` on CPU). Reports forward and forward+backward times and the ratios the issue
targets (<= 1.3x ``nn.Conv2d``, >= 1.5x faster than the grouped trick, both fwd+bwd).
Run directly too: ``python -m dynconv.bench.condconv --help``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .common import add_layout_options, add_malloc_option, environment, measure_methods, pin_glibc_malloc, uses_channels_last

# name, N, C, H(=W), k, groups
SHAPES: list[tuple[str, int, int, int, int, int]] = [
    ("N256 C128 16x16 k3", 256, 128, 16, 3, 1),
    ("N64 C64 56x56 k3", 64, 64, 56, 3, 1),
    ("N128 C256 14x14 dw k3", 128, 256, 14, 3, 256),
    ("N128 C256 14x14 dw k5", 128, 256, 14, 5, 256),
]
EXPERTS = (4, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    shape: str
    experts: int
    dtype: str
    method: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mib: float | None
    note: str = ""


def grouped_conv_trick(x, weight, bias, routing_weights, stride=1, padding=0, dilation=1, groups=1):
    """timm ``CondConv2d.forward``: mix kernels with one matmul, run one grouped conv over the batch."""
    b, c, h, w = x.shape
    e, out = weight.shape[:2]
    kernels = torch.matmul(routing_weights, weight.reshape(e, -1)).view(b * out, *weight.shape[2:])
    bias_n = torch.matmul(routing_weights, bias).view(b * out) if bias is not None else None
    x = x.reshape(1, b * c, h, w)
    y = F.conv2d(x, kernels, bias_n, stride=stride, padding=padding, dilation=dilation, groups=groups * b)
    return y.permute([1, 0, 2, 3]).view(b, out, y.shape[-2], y.shape[-1])


def methods_for(device: torch.device) -> list[str]:
    from ..ops import condconv

    names = ["nn.Conv2d", "grouped-trick", "reference"]
    if device.type == "cuda" and "triton" in condconv.BACKENDS:
        names.append("triton")
    if device.type == "cpu" and "cpu" in condconv.BACKENDS:
        names.append("cpu")
    return names


def run(device: torch.device, dtypes: list[str], quick: bool, channels_last: bool, experts: tuple[int, ...]) -> list[Row]:
    from ..ops import cond_conv2d

    rows: list[Row] = []
    reps, warmup = (3, 1) if quick else ((20, 5) if device.type == "cuda" else (5, 2))
    for shape_name, n, c, hw, k, groups in SHAPES:
        if quick:
            n = max(2, n // 16)
            shape_name = f"{shape_name} (quick: N{n})"
        for dname in dtypes:
            dtype = DTYPES[dname]
            for e in experts:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(n, c, hw, hw, generator=gen).to(device, dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                weight = (torch.randn(e, c, c // groups, k, k, generator=gen) * 0.05).to(device, dtype).requires_grad_()
                bias = torch.zeros(e, c, device=device, dtype=dtype, requires_grad=True)
                logits = torch.randn(n, e, generator=gen).to(device, dtype).requires_grad_()
                conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=groups).to(device, dtype)
                if channels_last:
                    conv = conv.to(memory_format=torch.channels_last)
                pad = k // 2
                forwards: dict[str, Callable[[], torch.Tensor]] = {}
                for method in methods_for(device):
                    if method == "nn.Conv2d":
                        forwards[method] = lambda: conv(x)  # noqa: E731
                    elif method == "grouped-trick":
                        forwards[method] = lambda: grouped_conv_trick(x, weight, bias, torch.sigmoid(logits), 1, pad, 1, groups)  # noqa: E731
                    else:
                        forwards[method] = lambda m=method: cond_conv2d(  # noqa: E731
                            x, weight, bias, torch.sigmoid(logits), 1, pad, 1, groups, backend=m
                        )
                leaves = {m: [x, *conv.parameters()] if m == "nn.Conv2d" else [x, weight, bias, logits] for m in forwards}
                for method, got in measure_methods(forwards, leaves, device, reps, warmup).items():
                    note = got.note
                    if method == "reference":
                        note = (note + " same grouped-conv math as grouped-trick (bias added after the conv)").strip()
                    rows.append(Row(shape_name, e, dname, method, got.fwd_ms, got.fwd_bwd_ms, got.peak_mib, note))
                    print(_fmt_row(rows[-1]), flush=True)
    return rows


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _fmt_row(r: Row) -> str:
    return f"| {r.shape} | {r.experts} | {r.dtype} | {r.method} | {_f(r.fwd_ms)} | {_f(r.fwd_bwd_ms)} | {_f(r.peak_mib)} | {r.note} |"


def summary(rows: list[Row]) -> list[str]:
    """Per (shape, experts, dtype): fast backend fwd+bwd vs nn.Conv2d and vs the grouped trick."""
    out = ["| shape | E | dtype | backend | fwd+bwd / nn.Conv2d (target <= 1.3) | grouped-trick / backend (target >= 1.5) |",
           "|---|---|---|---|---|---|"]
    keys = sorted({(r.shape, r.experts, r.dtype) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        by = {r.method: r for r in rows if (r.shape, r.experts, r.dtype) == key}
        for fast in ("triton", "cpu"):
            if fast not in by or by[fast].fwd_bwd_ms is None:
                continue
            conv, trick = by.get("nn.Conv2d"), by.get("grouped-trick")
            a = by[fast].fwd_bwd_ms / conv.fwd_bwd_ms if conv and conv.fwd_bwd_ms else None
            b = trick.fwd_bwd_ms / by[fast].fwd_bwd_ms if trick and trick.fwd_bwd_ms else None
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {fast} | {_f(a)} | {_f(b)} |")
    return out


def build_parser(prog: str = "python -m dynconv.bench condconv", experts: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: bf16 on cuda, fp32 on cpu)")
    if experts:
        p.add_argument("--experts", default=",".join(map(str, EXPERTS)), help="comma list of expert counts (default 4,8)")
    p.add_argument("--quick", action="store_true", help="batch / 16 and 3 repetitions: a smoke run, not a measurement")
    add_layout_options(p)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default: torch's)")
    add_malloc_option(p)
    p.add_argument("--json", default=None, help="also write the rows and environment to this JSON file")
    return p


def prepare(args: argparse.Namespace) -> tuple[torch.device, list[str], bool, dict[str, str]]:
    """What the condconv and involution benchmarks set up alike from their parsed options:
    threads, the device, the dtypes (checked), channels_last, and the environment record
    (malloc pinned on CPU unless ``--default-malloc``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("bf16" if device.type == "cuda" else "fp32")).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: expected a comma list of {sorted(DTYPES)}, got {d!r}")
    channels_last = uses_channels_last(device, args)
    env = environment(device)
    env["malloc"] = pin_glibc_malloc(device, args.default_malloc)
    return device, dtypes, channels_last, env


def report(args: argparse.Namespace, env: dict[str, str], channels_last: bool, rows: list[Row], summary_lines: list[str]) -> None:
    """Print the target summary and write ``--json`` (environment, settings and rows)."""
    print()
    print("\n".join(summary_lines))
    if args.json:
        payload = {"env": env, "channels_last": channels_last, "quick": args.quick, "rows": [asdict(r) for r in rows]}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m dynconv.bench condconv``."""
    args = build_parser().parse_args(argv)
    device, dtypes, channels_last, env = prepare(args)
    experts = tuple(int(v) for v in args.experts.split(","))
    print(f"# condconv benchmark: {env}, channels_last={channels_last}, quick={args.quick}")
    print("| shape | E | dtype | method | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | note |")
    print("|---|---|---|---|---|---|---|---|")
    rows = run(device, dtypes, args.quick, channels_last, experts)
    report(args, env, channels_last, rows, summary(rows))


if __name__ == "__main__":
    main()
