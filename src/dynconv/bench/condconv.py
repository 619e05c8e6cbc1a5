"""``python -m dynconv.bench condconv``: CondConv / Dynamic Convolution speed.

Compares, per shape and expert count: ``nn.Conv2d`` (a plain conv, the cost floor),
the grouped-conv trick (timm's ``CondConv2d``: batch folded into conv groups, mixed bias
passed to the conv), dynconv's ``reference`` backend (the same grouped-conv math with the
bias added afterwards), every fast backend that runs on the device (``cpu`` and ``experts``,
the PyTorch paths, anywhere; ``triton`` on CUDA) and ``auto`` (with the backend it picked).
Reports forward and forward+backward times, their ratios to ``nn.Conv2d``, and the targets,
judged on ``auto`` (what a layer runs by default): on the default shapes fwd+bwd <= 1.3x
``nn.Conv2d`` and >= 1.5x faster than the grouped trick; on ResNet-18's CIFAR stages
(``--shape-set resnet18-cifar``, issue 12) fwd+bwd <= 1.6x ``nn.Conv2d`` where the map has
>= 256 pixels, and never more than E x (the cost of computing every expert).
Run directly too: ``python -m dynconv.bench.condconv --help``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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

# name, N, C, H(=W), k, groups
SHAPES: list[tuple[str, int, int, int, int, int]] = [
    ("N256 C128 16x16 k3", 256, 128, 16, 3, 1),
    ("N64 C64 56x56 k3", 64, 64, 56, 3, 1),
    ("N128 C256 14x14 dw k3", 128, 256, 14, 3, 256),
    ("N128 C256 14x14 dw k5", 128, 256, 14, 5, 256),
]
#: ``--shape-set resnet18-cifar``: the 3x3 convs of ResNet-18's CIFAR stages.
RESNET18_CIFAR_SHAPES: list[tuple[str, int, int, int, int, int]] = [
    (f"{name} k3", n, c, hw, 3, 1) for name, n, c, hw in RESNET18_CIFAR_STAGES
]
EXPERTS = (4, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Every method the benchmark knows; ``--methods`` picks among them (``nn.Conv2d`` always runs:
#: the ratios need it).
METHODS = ("nn.Conv2d", "grouped-trick", "reference", "cpu", "experts", "triton", "auto")
#: dynconv's fast backends and ``auto``, in the order the summary lists them.
FAST_METHODS = ("cpu", "experts", "triton", "auto")


def shapes_of(shape_set: str) -> list[tuple[str, int, int, int, int, int]]:
    """The shapes of a ``--shape-set`` (read at call time, so tests can swap :data:`SHAPES`)."""
    return {"default": SHAPES, "resnet18-cifar": RESNET18_CIFAR_SHAPES}[shape_set]


def batch_label(n: int, quick: bool, batch: int | None) -> tuple[int, str]:
    """The batch size a run uses for a shape of batch ``n``, and the suffix its shape name gets."""
    if batch:
        return batch, f" (batch {batch})"
    if quick:
        n = max(2, n // 16)
        return n, f" (quick: N{n})"
    return n, ""


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
    pixels: int = 0  # output pixels per example (the targets depend on them)
    runs: str = ""  # the backend that ran: for 'auto', its choice


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
    """The methods that run on ``device``: every backend in this install (``triton`` on CUDA only)."""
    from ..ops import condconv

    backends = [b for b in condconv.BACKENDS if b != "triton" or device.type == "cuda"]
    return ["nn.Conv2d", "grouped-trick", "reference", *backends, "auto"]


def run(
    device: torch.device, dtypes: list[str], quick: bool, channels_last: bool, experts: tuple[int, ...],
    shapes: list[tuple[str, int, int, int, int, int]] | None = None, methods: list[str] | None = None,
    batch: int | None = None,
) -> list[Row]:
    """Time every (shape, dtype, experts); within one, all methods interleaved. ``shapes``:
    :data:`SHAPES` by default; ``methods``: :func:`methods_for` the device by default."""
    from ..ops import cond_conv2d
    from ..ops.condconv import BACKENDS

    rows: list[Row] = []
    reps, warmup = (3, 1) if quick else ((20, 5) if device.type == "cuda" else (5, 2))
    methods = methods or methods_for(device)
    for shape_name, n, c, hw, k, groups in SHAPES if shapes is None else shapes:
        n, label = batch_label(n, quick, batch)
        shape_name += label
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
                geometry = ((1, 1), (pad, pad), (1, 1))
                chosen = BACKENDS.choose("auto", x, weight, *geometry, groups)
                forwards: dict[str, Callable[[], torch.Tensor]] = {}
                for method in methods:
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
                    if method == "auto":
                        note = (note + f" auto -> {chosen}").strip()
                    runs = chosen if method == "auto" else method
                    rows.append(Row(shape_name, e, dname, method, got.fwd_ms, got.fwd_bwd_ms, got.peak_mib, note, hw * hw, runs))
                    print(_fmt_row(rows[-1]), flush=True)
    return rows


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _fmt_row(r: Row) -> str:
    return f"| {r.shape} | {r.experts} | {r.dtype} | {r.method} | {_f(r.fwd_ms)} | {_f(r.fwd_bwd_ms)} | {_f(r.peak_mib)} | {r.note} |"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _groups(rows: list[Row]) -> list[dict[str, Row]]:
    """The rows of each (shape, experts, dtype), by method, in the order they ran."""
    keys = list(dict.fromkeys((r.shape, r.experts, r.dtype) for r in rows))
    return [{r.method: r for r in rows if (r.shape, r.experts, r.dtype) == key} for key in keys]


def summary(rows: list[Row], shape_set: str = "default") -> list[str]:
    """Per (shape, experts, dtype): each fast backend's and ``auto``'s fwd and fwd+bwd against
    ``nn.Conv2d`` and the grouped trick, then the targets (:func:`target_lines`)."""
    out = ["| shape | E | dtype | backend | fwd / nn.Conv2d | fwd+bwd / nn.Conv2d | grouped-trick / backend (fwd+bwd) |",
           "|---|---|---|---|---|---|---|"]
    for by in _groups(rows):
        conv, trick = by.get("nn.Conv2d"), by.get("grouped-trick")
        for fast in FAST_METHODS:
            row = by.get(fast)
            if row is None or row.fwd_bwd_ms is None:
                continue
            a = _ratio(row.fwd_ms, conv.fwd_ms if conv else None)
            b = _ratio(row.fwd_bwd_ms, conv.fwd_bwd_ms if conv else None)
            c = _ratio(trick.fwd_bwd_ms if trick else None, row.fwd_bwd_ms)
            name = f"auto ({row.runs})" if fast == "auto" else fast
            out.append(f"| {row.shape} | {row.experts} | {row.dtype} | {name} | {_f(a)} | {_f(b)} | {_f(c)} |")
    lines = target_lines(rows, shape_set)
    return out + (["", "targets (judged on auto):", *lines] if lines else [])


def target_lines(rows: list[Row], shape_set: str) -> list[str]:
    """The issues' targets for ``auto``'s fwd+bwd. Default shapes: <= 1.3x ``nn.Conv2d`` and
    >= 1.5x faster than the grouped trick. ResNet-18 CIFAR stages (issue 12): <= 1.6x
    ``nn.Conv2d`` where the map has >= 256 pixels, and at most E x everywhere."""
    lines = []
    for by in _groups(rows):
        auto, conv, trick = by.get("auto"), by.get("nn.Conv2d"), by.get("grouped-trick")
        if auto is None or conv is None:
            continue
        ratio = _ratio(auto.fwd_bwd_ms, conv.fwd_bwd_ms)
        checks = []
        if shape_set == "resnet18-cifar":
            limit = min(1.6, auto.experts) if auto.pixels >= 256 else auto.experts
            checks.append(("fwd+bwd / nn.Conv2d", ratio, ratio is not None and ratio <= limit, f"<= {limit:g}"))
        else:
            speedup = _ratio(trick.fwd_bwd_ms if trick else None, auto.fwd_bwd_ms)
            checks.append(("fwd+bwd / nn.Conv2d", ratio, ratio is not None and ratio <= 1.3, "<= 1.3"))
            checks.append(("grouped-trick / auto", speedup, speedup is not None and speedup >= 1.5, ">= 1.5"))
        text = "; ".join(f"{label} {_f(v)} (target {t}) {'ok' if ok else 'MISSED'}" for label, v, ok, t in checks)
        lines.append(f"- {auto.shape} E={auto.experts} {auto.dtype}, auto ({auto.runs}): {text}")
    return lines


def build_parser(prog: str = "python -m dynconv.bench condconv", experts: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: bf16 on cuda, fp32 on cpu)")
    if experts:
        p.add_argument("--experts", default=",".join(map(str, EXPERTS)), help="comma list of expert counts (default 4,8)")
        p.add_argument(
            "--methods", default=None,
            help=f"comma list of {','.join(METHODS)} (default: all that run on the device; nn.Conv2d always runs)",
        )
    add_shape_set_option(p)
    p.add_argument("--quick", action="store_true", help="batch / 16 and 3 repetitions: a smoke run, not a measurement")
    add_batch_option(p)
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
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch: expected a positive batch size, got {args.batch}")
    channels_last = uses_channels_last(device, args)
    env = environment(device)
    env["malloc"] = pin_glibc_malloc(device, args.default_malloc)
    return device, dtypes, channels_last, env


def report(args: argparse.Namespace, env: dict[str, str], channels_last: bool, rows: list[Row], summary_lines: list[str]) -> None:
    """Print the target summary and write ``--json`` (environment, settings and rows)."""
    print()
    print("\n".join(summary_lines))
    if args.json:
        payload = {
            "env": env, "channels_last": channels_last, "quick": args.quick, "shape_set": args.shape_set,
            "batch": args.batch, "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m dynconv.bench condconv``."""
    args = build_parser().parse_args(argv)
    device, dtypes, channels_last, env = prepare(args)
    experts = tuple(int(v) for v in args.experts.split(","))
    available = methods_for(device)
    methods = available
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in available]
        if unknown:
            raise SystemExit(f"--methods: expected a comma list of {available} on {device}, got {unknown}")
        methods = ["nn.Conv2d", *(m for m in methods if m != "nn.Conv2d")]  # the ratios need the baseline
    print(f"# condconv benchmark: {env}, channels_last={channels_last}, quick={args.quick}, shape set {args.shape_set}")
    print("| shape | E | dtype | method | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | note |")
    print("|---|---|---|---|---|---|---|---|")
    rows = run(device, dtypes, args.quick, channels_last, experts, shapes_of(args.shape_set), methods, args.batch)
    report(args, env, channels_last, rows, summary(rows, args.shape_set))


if __name__ == "__main__":
    main()
