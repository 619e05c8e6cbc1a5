"""``python -m dynconv.bench involution``: involution speed and peak memory.

Compares the official unfold-based PyTorch involution (Li et al. 2021's non-CUDA path),
dynconv's ``reference`` backend (the same unfold math), and the fast backends usable on
the device (``triton`` on CUDA, ``cpu`` on CPU). Reports forward and forward+backward
times and, on CUDA, the peak memory of forward+backward above the inputs; the issue's
targets are fwd+bwd >= 4x faster than unfold and peak memory <= 1/4 of unfold's.
Run directly too: ``python -m dynconv.bench.involution --help``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .common import measure_methods
from .condconv import DTYPES, Row, _f, _fmt_row, build_parser, prepare, report

# name, N, C, H(=W), K, G
SHAPES: list[tuple[str, int, int, int, int, int]] = [
    ("N64 C256 56x56 K7 G16", 64, 256, 56, 7, 16),
    ("N32 C128 64x64 K3 G8", 32, 128, 64, 3, 8),
    ("N256 C64 32x32 K3 G4", 256, 64, 32, 3, 4),
]


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


def run(device: torch.device, dtypes: list[str], quick: bool, channels_last: bool) -> list[Row]:
    from ..ops import involution2d

    rows: list[Row] = []
    reps, warmup = (3, 1) if quick else ((20, 5) if device.type == "cuda" else (5, 2))
    for shape_name, n, c, hw, k, g in SHAPES:
        if quick:
            n = max(2, n // 16)
            shape_name = f"{shape_name} (quick: N{n})"
        for dname in dtypes:
            dtype = DTYPES[dname]
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, hw, hw, generator=gen).to(device, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            kernel = (torch.randn(n, g, k * k, hw, hw, generator=gen) / k).to(device, dtype).requires_grad_()
            forwards = {}
            for method in methods_for(device):
                if method == "unfold":
                    forwards[method] = lambda: unfold_involution(x, kernel, k, 1, g)  # noqa: E731
                else:
                    forwards[method] = lambda m=method: involution2d(x, kernel, k, 1, k // 2, 1, g, backend=m)  # noqa: E731
            leaves = {m: [x, kernel] for m in forwards}
            for method, got in measure_methods(forwards, leaves, device, reps, warmup).items():
                note = got.note
                if method == "reference":
                    note = (note + " same unfold math as 'unfold'").strip()
                rows.append(Row(shape_name, 0, dname, method, got.fwd_ms, got.fwd_bwd_ms, got.peak_mib, note))
                print(_fmt_row(rows[-1]).replace(f"| {shape_name} | 0 |", f"| {shape_name} |"), flush=True)
    return rows


def summary(rows: list[Row]) -> list[str]:
    out = ["| shape | dtype | backend | unfold / backend fwd+bwd (target >= 4) | peak memory backend / unfold (target <= 0.25) |",
           "|---|---|---|---|---|"]
    keys = sorted({(r.shape, r.dtype) for r in rows})
    for key in keys:
        by = {r.method: r for r in rows if (r.shape, r.dtype) == key}
        unf = by.get("unfold")
        for fast in ("triton", "cpu"):
            if fast not in by or by[fast].fwd_bwd_ms is None:
                continue
            speed = unf.fwd_bwd_ms / by[fast].fwd_bwd_ms if unf and unf.fwd_bwd_ms else None
            mem = by[fast].peak_mib / unf.peak_mib if unf and unf.peak_mib and by[fast].peak_mib is not None else None
            out.append(f"| {key[0]} | {key[1]} | {fast} | {_f(speed)} | {_f(mem)} |")
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m dynconv.bench involution``."""
    parser = build_parser("python -m dynconv.bench involution", experts=False)
    parser.description = __doc__.splitlines()[0]
    args = parser.parse_args(argv)
    device, dtypes, channels_last, env = prepare(args)
    print(f"# involution benchmark: {env}, channels_last={channels_last}, quick={args.quick}")
    print("| shape | dtype | method | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | note |")
    print("|---|---|---|---|---|---|---|")
    rows = run(device, dtypes, args.quick, channels_last)
    report(args, env, channels_last, rows, summary(rows))


if __name__ == "__main__":
    main()
