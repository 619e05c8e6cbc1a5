"""The main job: x2 super-resolution with four kinds of convolution at matched FLOPs.

Trains four SR networks of the same shape and (within a few per cent) the same FLOPs per
output pixel - plain conv, switched conv (hard routing, breadth 8), CondConv and involution -
with the project's trainer on random crops of the photos bundled with scikit-image, scores
them on held-out photos against bicubic upsampling (PSNR / SSIM on Y, ``scale`` pixels
shaved), prints a table and writes a self-contained HTML report (the table, loss curves,
sample crops, selector maps and expert usage) to ``OUT/report.html``. Each model's run
directory (config, checkpoints, log.jsonl, TensorBoard) is kept under ``OUT/<model>``.

On 2 CPU cores the default settings take about 3-5 minutes; on a GPU, larger settings
scale it up, e.g. ``dynconv demo --device cuda --steps 20000 --channels 64 --data-root
../shared/data/sr`` (T91 for training, Set5 for evaluation).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, config_from_dict
from .data import bicubic_resize
from .insight import normalised_entropy, routing_stats, selector_maps
from .metrics import psnr_y, ssim_y
from .models import build_model, match_flops
from .models.flops import count_parameters, flops_per_pixel
from .report import Report, array_png, figure_png

#: name -> (registered model, layer options). Channels are matched to the plain net's FLOPs.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("sr_plain", {}),
    "switched": ("sr_switched", {"layer": {"breadth": 8, "selector": "conv1x1", "routing": "hard", "norm_buffer": 64}}),
    "condconv": ("sr_condconv", {"layer": {"num_experts": 4, "routing": "sigmoid"}}),
    "involution": ("sr_involution", {"layer": {"kernel_size": 3}}),
}


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    steps: int = 300
    batch_size: int = 16
    patch_size: int = 64  # HR pixels
    channels: int = 32  # of the plain net; the others are matched to its FLOPs
    num_layers: int = 5
    scale: int = 2
    lr: float = 2e-3
    device: str = "auto"
    seed: int = 0
    data_root: str | None = None  # a folder with train/T91 and test/Set5 (sr_folder); None: scikit-image photos
    models: list[str] = field(default_factory=lambda: list(VARIANTS))


@dataclass
class ModelResult:
    name: str
    model: str
    channels: int
    params: int
    flops_per_pixel: float
    steps: int
    train_seconds: float
    psnr_y: float
    ssim_y: float
    curve: list[tuple[int, float]]
    routing: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------- configs
def data_section(s: DemoSettings) -> dict[str, Any]:
    if s.data_root is None:
        return {
            "name": "skimage_sr",
            "options": {"scale": s.scale},
            "train_options": {"patch_size": s.patch_size, "augment": True, "repeat": 64},
            "eval_options": {"patch_size": None, "augment": False},
        }
    return {
        "name": "sr_folder",
        "root": s.data_root,
        "train_split": "train/T91",
        "eval_split": "test/Set5",
        "options": {"scale": s.scale},
        "train_options": {"patch_size": s.patch_size, "augment": True, "repeat": 20},
        "eval_options": {"patch_size": None, "augment": False},
    }


def model_options(s: DemoSettings, name: str, target: float) -> dict[str, Any]:
    """The variant's options with ``channels`` chosen to match ``target`` FLOPs per pixel."""
    registered, extra = VARIANTS[name]
    options = {"num_layers": s.num_layers, **extra}
    if name == "plain":
        return {"scale": s.scale, **options, "channels": s.channels}
    match = match_flops(registered, target, s.scale, lr_size=s.patch_size // s.scale, **options)
    return {"scale": s.scale, **options, "channels": match["channels"]}


def demo_config(s: DemoSettings, name: str, options: dict[str, Any]) -> Config:
    raw = {
        "model": {"name": VARIANTS[name][0], "options": options},
        "data": data_section(s),
        "optim": {"name": "adam", "lr": s.lr},
        "schedule": {"name": "cosine", "warmup_steps": min(20, s.steps // 10), "min_lr": s.lr / 50},
        "losses": [{"name": "l1"}],
        "train": {"steps": s.steps, "batch_size": s.batch_size, "seed": s.seed, "device": s.device},
        "eval": {"every": s.steps, "batch_size": 1, "metrics": ["psnr_y", "ssim_y"]},
        "log": {"every": max(1, s.steps // 30), "checkpoint_every": s.steps, "keep_last": 1, "progress": False,
                "tensorboard": True},
    }
    return config_from_dict(raw)


# --------------------------------------------------------------------------------- training
def _curve_and_time(run_dir: Path, batch_size: int) -> tuple[list[tuple[int, float]], float]:
    """Loss curve and pure training time from the run's ``log.jsonl`` (evaluation excluded)."""
    curve, seconds, last = [], 0.0, 0
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "train":
            curve.append((event["step"], event["loss"]))
            seconds += (event["step"] - last) * batch_size / max(event["samples_per_s"], 1e-9)
            last = event["step"]
    return curve, seconds


@torch.no_grad()
def held_out_sample(model: torch.nn.Module, dataset, device: torch.device) -> dict[str, torch.Tensor]:
    """The first held-out image's LR, HR and the model's output, for the report's pictures."""
    model.eval()
    item = dataset[0]
    sr = model(item["lr"][None].to(device)).float().clamp(0, 1).cpu()
    return {"lr": item["lr"], "hr": item["hr"], "sr": sr[0]}


def train_variant(s: DemoSettings, name: str, target: float, log) -> tuple[ModelResult, torch.nn.Module, dict, Any]:
    """Train one variant; returns its result, the trained model, the held-out sample and
    the eval dataset. PSNR/SSIM are the trainer's final evaluation (all held-out images)."""
    from .train import Trainer

    options = model_options(s, name, target)
    config = demo_config(s, name, options)
    run_dir = s.out / name
    trainer = Trainer(config, run_dir)
    log(f"[{name}] {VARIANTS[name][0]} channels={options['channels']}: training {s.steps} steps ...")
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    curve, seconds = _curve_and_time(run_dir, s.batch_size)
    model = trainer.eval_model()
    psnr, ssim = result.metrics["psnr_y"], result.metrics["ssim_y"]
    lr_shape = (1, 3, s.patch_size // s.scale, s.patch_size // s.scale)
    routing = None
    if name == "switched":
        stats = routing_stats(model)
        routing = {layer: {"usage": v["usage"].tolist(), "entropy": v["entropy"]} for layer, v in stats.items()}
    log(f"[{name}] done in {wall:.1f} s (training {seconds:.1f} s): PSNR-Y {psnr:.2f} dB, SSIM-Y {ssim:.4f}")
    return (
        ModelResult(
            name=name, model=VARIANTS[name][0], channels=options["channels"], params=count_parameters(model),
            flops_per_pixel=flops_per_pixel(model, lr_shape), steps=result.step, train_seconds=seconds,
            psnr_y=psnr, ssim_y=ssim, curve=curve, routing=routing,
        ),
        model,
        held_out_sample(model, trainer.eval_dataset, trainer.device),
        trainer.eval_dataset,
    )


# ----------------------------------------------------------------------------------- report
def _to_hwc(image: torch.Tensor) -> np.ndarray:
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def _crop_box(hr: torch.Tensor, size: int) -> tuple[int, int]:
    """The most detailed ``size`` x ``size`` window (largest gradient energy) of an HR image."""
    gray = hr.mean(0)
    energy = (gray[1:, :-1] - gray[:-1, :-1]).abs() + (gray[:-1, 1:] - gray[:-1, :-1]).abs()
    pooled = torch.nn.functional.avg_pool2d(energy[None, None], size, stride=max(size // 4, 1))[0, 0]
    index = int(pooled.argmax())
    row, col = divmod(index, pooled.shape[1])
    stride = max(size // 4, 1)
    return row * stride, col * stride


def _enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, 0).repeat(factor, 1)


def build_report(s: DemoSettings, rows: list[dict], results: list[ModelResult], samples: dict[str, dict],
                 bicubic: torch.Tensor, switched: torch.nn.Module | None, eval_names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .viz import _expert_colours

    report = Report(f"dynconv demo: x{s.scale} super-resolution at matched FLOPs")
    data = "scikit-image's bundled photos" if s.data_root is None else f"{s.data_root} (T91 / Set5)"
    report.paragraph(
        f"Four {s.num_layers}-layer SR networks whose hidden 3x3 layers are plain convs, switched convs, CondConv or "
        f"involution, with channels chosen so that every network costs about the same FLOPs per output pixel. Each "
        f"was trained for {s.steps} steps (batch {s.batch_size}, {s.patch_size}px HR crops, L1, Adam) on {data}, and "
        f"evaluated on the held-out images {', '.join(eval_names)} (PSNR/SSIM on Y, {s.scale}px border shaved). "
        "Train time is wall-clock on this machine and excludes evaluation."
    )
    report.heading("Results").table(rows)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in results:
        if r.curve:
            steps, losses = zip(*r.curve)
            ax.plot(steps, losses, label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training L1 loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    report.heading("Loss curves").image(figure_png(fig), "training loss (mean over each logging window)")

    first = samples[results[0].name]
    hr = first["hr"]
    size = min(96, hr.shape[1], hr.shape[2])
    top, left = _crop_box(hr, size)
    window = (slice(None), slice(top, top + size), slice(left, left + size))
    factor = max(1, 256 // size)
    crops = [(array_png(_enlarge(_to_hwc(hr[window]), factor)), "ground truth"),
             (array_png(_enlarge(_to_hwc(bicubic[0][window]), factor)), "bicubic")]
    for r in results:
        crops.append((array_png(_enlarge(_to_hwc(samples[r.name]["sr"][window]), factor)), r.name))
    report.heading(f"Sample crops ({eval_names[0]}, {size}x{size} HR pixels, enlarged)").images(crops)

    if switched is not None:
        lr = first["lr"][None].to(next(switched.parameters()).device)
        maps = selector_maps(switched, lr)
        report.heading("Selector maps (switched net, held-out image)")
        report.paragraph("The expert each output pixel used in each switched layer, one colour per expert, beside the LR input.")
        items = [(array_png(_to_hwc(first["lr"])), "LR input")]
        breadths = {name: switched.get_submodule(name).breadth for name in maps}
        for name, selection in maps.items():
            colours = _expert_colours(breadths[name])
            items.append((array_png(colours[selection[0].cpu().numpy()]), name))
        report.images(items, width=220)

        result = next(r for r in results if r.name == "switched")
        fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 2.6), squeeze=False)
        usage_rows = []
        for ax, (name, selection) in zip(axes[0], maps.items()):
            breadth = breadths[name]
            held = torch.bincount(selection.flatten().cpu(), minlength=breadth).double()
            held = held / held.sum()
            train = torch.tensor(result.routing[name]["usage"]) if result.routing else held
            x = np.arange(breadth)
            ax.bar(x - 0.2, train.numpy(), 0.4, label="training (recent steps)", color="#4c72b0")
            ax.bar(x + 0.2, held.numpy(), 0.4, label="held-out image", color="#dd8452")
            ax.axhline(1 / breadth, color="k", lw=0.8, ls="--")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("expert")
            usage_rows.append({"layer": name, "entropy (training)": normalised_entropy(train),
                               "entropy (held-out)": normalised_entropy(held),
                               "experts used (held-out)": int((held > 0).sum())})
        axes[0][0].set_ylabel("fraction of pixels")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        report.heading("Expert usage").image(figure_png(fig), "fraction of pixels per expert; dashed: uniform")
        report.paragraph("Normalised routing entropy: 1 = all experts used equally, 0 = one expert takes every pixel.")
        report.table(usage_rows)
    return report.write(s.out / "report.html")


# ------------------------------------------------------------------------------------- main
def run(s: DemoSettings, log=print) -> dict[str, Any]:
    s.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    lr_shape = (1, 3, s.patch_size // s.scale, s.patch_size // s.scale)
    target = flops_per_pixel(build_model("sr_plain", scale=s.scale, num_layers=s.num_layers, channels=s.channels), lr_shape)
    log(f"dynconv demo: x{s.scale} SR, {len(s.models)} models at ~{target:,.0f} FLOPs per HR pixel, {s.steps} steps each -> {s.out}")
    results, samples, modules = [], {}, {}
    total_start = time.perf_counter()
    for name in s.models:
        result, model, sample, eval_dataset = train_variant(s, name, target, log)
        results.append(result)
        samples[name] = sample
        modules[name] = model

    names = list(eval_dataset.names) if hasattr(eval_dataset, "names") else [f"image {i}" for i in range(len(eval_dataset))]
    pairs = [eval_dataset[i] for i in range(len(eval_dataset))]
    bicubic = [bicubic_resize(p["lr"][None], s.scale).clamp(0, 1) for p in pairs]
    bic_psnr = float(np.mean([float(psnr_y(b, p["hr"][None], s.scale)[0]) for b, p in zip(bicubic, pairs)]))
    bic_ssim = float(np.mean([float(ssim_y(b, p["hr"][None], s.scale)[0]) for b, p in zip(bicubic, pairs)]))
    rows = [{"model": "bicubic", "channels": "-", "params": 0, "FLOPs/px": "-", "steps": "-", "train s": "-",
             "PSNR-Y": bic_psnr, "SSIM-Y": bic_ssim, "dPSNR vs bicubic": 0.0}]
    for r in results:
        rows.append({"model": r.name, "channels": r.channels, "params": r.params, "FLOPs/px": round(r.flops_per_pixel),
                     "steps": r.steps, "train s": r.train_seconds, "PSNR-Y": r.psnr_y, "SSIM-Y": r.ssim_y,
                     "dPSNR vs bicubic": r.psnr_y - bic_psnr})
    report = build_report(s, rows, results, samples, bicubic[0], modules.get("switched"), names)
    elapsed = time.perf_counter() - total_start
    table = format_table(rows)
    log("")
    log(table)
    log(f"\nreport: {report}   (total {elapsed:.0f} s)")
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
        "target_flops_per_pixel": target,
        "rows": rows,
        "results": [{k: v for k, v in r.__dict__.items() if k != "curve"} for r in results],
        "eval_images": names,
        "report": str(report),
        "seconds": elapsed,
        "torch": torch.__version__,
    }
    (s.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


FORMATS = {"train s": "{:.1f}", "PSNR-Y": "{:.2f}", "SSIM-Y": "{:.4f}", "dPSNR vs bicubic": "{:+.2f}"}


def format_table(rows: list[dict]) -> str:
    """A plain-text table for the console (the report has the HTML one)."""
    columns = list(rows[0])

    def cell(column: str, v: Any) -> str:
        if isinstance(v, float):
            return FORMATS.get(column, "{:.4g}").format(v)
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> DemoSettings:
    p = argparse.ArgumentParser(
        prog="dynconv demo",
        description="x2 SR with plain, switched, CondConv and involution layers at matched FLOPs; "
        "prints a table and writes OUT/report.html.",
        epilog="examples:\n  dynconv demo                       # CPU, ~3-5 min, scikit-image photos\n"
        "  dynconv demo --quick --out /tmp/d  # a smoke run in seconds\n"
        "  dynconv demo --device cuda --steps 20000 --channels 64 --data-root ../shared/data/sr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DemoSettings()
    p.add_argument("--out", type=Path, default=d.out, help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="HR training crop (default: %(default)s)")
    p.add_argument("--channels", type=int, default=d.channels, help="the plain net's channels; the others match its FLOPs")
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--scale", type=int, default=d.scale, choices=(2, 3, 4))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-root", default=None, help="folder with train/T91 and test/Set5 (default: scikit-image photos)")
    p.add_argument("--models", nargs="+", default=d.models, choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="a few steps on small crops: checks the pipeline, not the claims")
    a = p.parse_args(argv)
    s = DemoSettings(out=a.out, steps=a.steps, batch_size=a.batch_size, patch_size=a.patch_size, channels=a.channels,
                     num_layers=a.num_layers, scale=a.scale, lr=a.lr, device=a.device, seed=a.seed,
                     data_root=a.data_root, models=a.models)
    if a.quick:
        s.steps, s.batch_size, s.patch_size, s.channels = 4, 4, 32, 8
    for name in ("steps", "batch_size", "patch_size", "channels", "num_layers"):
        if getattr(s, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.patch_size % s.scale:
        p.error(f"--patch-size must be a multiple of --scale ({s.scale}), got {s.patch_size}")
    return s


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
