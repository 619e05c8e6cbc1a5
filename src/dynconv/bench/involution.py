"""``python -m dynconv.bench involution``: involution speed and peak memory.

Compares the official unfold-based PyTorch involution (Li et al. 2021's non-CUDA path),
dynconv's ``reference`` backend (the same unfold math), and the fast backends usable on
the device (``triton`` on CUDA, ``cpu`` on CPU); on ResNet-18's CIFAR stages
(``--shape-set resnet18-cifar``) also the dense 3x3 conv that involution replaces there.
Reports forward and forward+backward times and, on CUDA, the peak memory of
forward+backward above the inputs; the issue's targets are fwd+bwd >= 4x faster than
unfold and peak memory <= 1/4 of unfold's.
Run directly too: ``python -m dynconv.bench.involution --help``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .common import RESNET18_CIFAR_STAGES, measure_methods
from .condconv import DTYPES, Row, _f, _fmt_row, batch_label, build_parser, prepare, report

# name, N, C, H(=W), K, G
SHAPES: list[tuple[str, int, int, int, int, int]] = [
    ("N64 C256 56x56 K7 G16", 64, 256, 56, 7, 16),
    ("N32 C128 64x64 K3 G8", 32, 128, 64, 3, 8),
    ("N256 C64 32x32 K3 G4", 256, 64, 32, 3, 4),
]
#: ``--shape-set resnet18-cifar``: involution in place of ResNet-18's CIFAR 3x3 convs, K3 and
#: ``Involution2d``'s default groups (channels / 16).
RESNET18_CIFAR_SHAPES: list[tuple[str, int, int, int, int, int]] = [
    (f"{name} K3 G{c // 16}", n, c, hw, 3, c // 16) for name, n, c, hw in RESNET18_CIFAR_STAGES
]


def shapes_of(shape_set: str) -> list[tuple[str, int, int, int, int, int]]:
    """The shapes of a ``--shape-set`` (read at call time, so tests can swap :data:`SHAPES`)."""
    return {"default": SHAPES, "resnet18-cifar": RESNET18_CIFAR_SHAPES}[shape_set]


def unfold_involution(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, groups: int) -> torch.Tensor:
    """The official implementation's unfold path (``involution_naive``'s core), same padding rule."""
    b, c, h, w = x.shape
    k = kernel_size
    ho, wo = weight.shape[-2:]
    unfolded = F.unfold(x, k, 1, (k - 1) // 2, stride).view(b, groups, c // groups, k * k, ho, wo)
    return (weight.unsqueeze(2) * unfolded).sum(dim=3).view(b, c, ho, wo)


def methods_for(device: torch.device) -> list[str]:
    from ..ops import involution

    names = ["unfold", "reference"]
    if device.type == "cuda" and "triton" in involution.BACKENDS:
        names.append("triton")
    if device.type == "cpu" and "cpu" in involution.BACKENDS:
        names.append("cpu")
    return names


def run(
    device: torch.device, dtypes: list[str], quick: bool, channels_last: bool,
    shapes: list[tuple[str, int, int, int, int, int]] | None = None, batch: int | None = None,
    conv_baseline: bool = False,
) -> list[Row]:
    """Time every (shape, dtype), all methods interleaved; ``shapes``: :data:`SHAPES` by default.
    ``conv_baseline``: also time the dense 3x3 ``nn.Conv2d`` (C -> C) that involution replaces
    in a ResNet (the op alone, without involution's kernel-generating network)."""
    from ..ops import involution2d

    rows: list[Row] = []
    reps, warmup = (3, 1) if quick else ((20, 5) if device.type == "cuda" else (5, 2))
    for shape_name, n, c, hw, k, g in SHAPES if shapes is None else shapes:
        n, label = batch_label(n, quick, batch)
        shape_name += label
        for dname in dtypes:
            dtype = DTYPES[dname]
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, hw, hw, generator=gen).to(device, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            kernel = (torch.randn(n, g, k * k, hw, hw, generator=gen) / k).to(device, dtype).requires_grad_()
            conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device, dtype)
            if channels_last:
                conv = conv.to(memory_format=torch.channels_last)
            forwards = {"nn.Conv2d": lambda: conv(x)} if conv_baseline else {}  # noqa: E731
            for method in methods_for(device):
                if method == "unfold":
                    forwards[method] = lambda: unfold_involution(x, kernel, k, 1, g)  # noqa: E731
                else:
                    forwards[method] = lambda m=method: involution2d(x, kernel, k, 1, k // 2, 1, g, backend=m)  # noqa: E731
            leaves = {m: [x, *conv.parameters()] if m == "nn.Conv2d" else [x, kernel] for m in forwards}
            for method, got in measure_methods(forwards, leaves, device, reps, warmup).items():
                note = got.note
                if method == "reference":
                    note = (note + " same unfold math as 'unfold'").strip()
                rows.append(Row(shape_name, 0, dname, method, got.fwd_ms, got.fwd_bwd_ms, got.peak_mib, note))
                print(_fmt_row(rows[-1]).replace(f"| {shape_name} | 0 |", f"| {shape_name} |"), flush=True)
    return rows


def summary(rows: list[Row]) -> list[str]:
    """Per (shape, dtype), each fast backend against unfold; with the conv baseline, also its
    fwd+bwd over the dense 3x3 conv's."""
    with_conv = any(r.method == "nn.Conv2d" for r in rows)
    out = ["| shape | dtype | backend | unfold / backend fwd+bwd (target >= 4) | peak memory backend / unfold (target <= 0.25) |"
           + (" backend / nn.Conv2d 3x3 fwd+bwd |" if with_conv else ""),
           "|---|---|---|---|---|" + ("---|" if with_conv else "")]
    keys = sorted({(r.shape, r.dtype) for r in rows})
    for key in keys:
        by = {r.method: r for r in rows if (r.shape, r.dtype) == key}
        unf, conv = by.get("unfold"), by.get("nn.Conv2d")
        for fast in ("triton", "cpu"):
            if fast not in by or by[fast].fwd_bwd_ms is None:
                continue
            speed = unf.fwd_bwd_ms / by[fast].fwd_bwd_ms if unf and unf.fwd_bwd_ms else None
            mem = by[fast].peak_mib / unf.peak_mib if unf and unf.peak_mib and by[fast].peak_mib is not None else None
            line = f"| {key[0]} | {key[1]} | {fast} | {_f(speed)} | {_f(mem)} |"
            if with_conv:
                line += f" {_f(by[fast].fwd_bwd_ms / conv.fwd_bwd_ms if conv and conv.fwd_bwd_ms else None)} |"
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m dynconv.bench involution``."""
    parser = build_parser("python -m dynconv.bench involution", experts=False)
    parser.description = __doc__.splitlines()[0]
    args = parser.parse_args(argv)
    device, dtypes, channels_last, env = prepare(args)
    print(f"# involution benchmark: {env}, channels_last={channels_last}, quick={args.quick}, shape set {args.shape_set}")
    print("| shape | dtype | method | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | note |")
    print("|---|---|---|---|---|---|---|")
    cifar = args.shape_set == "resnet18-cifar"
    rows = run(device, dtypes, args.quick, channels_last, shapes_of(args.shape_set), args.batch, conv_baseline=cifar)
    report(args, env, channels_last, rows, summary(rows))


if __name__ == "__main__":
    main()
