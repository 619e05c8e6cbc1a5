"""The main job: staged training in miniature, the way switched convolutions are meant to be trained.

x2 super-resolution with a 5-layer net, with the project's trainer, on random crops of the
photos bundled with scikit-image:

1. **Stage 1** - a plain net (every layer an ``nn.Conv2d``) is trained for ``plain_steps``.
2. **Branch point** - from that one checkpoint, several runs go on for ``branch_steps`` each,
   with the same schedule (a warm restart of the learning rate) and the same batches in the
   same order (same seed; every branch starts the data stream at its beginning):

   * ``plain`` - the control: the plain net, trained on unchanged;
   * ``switched`` - its hidden convs converted to switched convs (``dynconv.convert``,
     breadth 8, every expert a copy of the trained kernel, so the outputs are unchanged at
     the branch point), then trained on so the experts specialise;
   * ``condconv`` - the same convs converted to CondConv (function-preserving as well).

   Involution has no conversion from a trained conv in ``dynconv.convert`` (it has no
   kernel to copy: its kernels are generated per pixel), so it is not a branch here.

Every net is scored on held-out photos against bicubic upsampling (PSNR / SSIM on Y,
``scale`` pixels shaved). The console gets a table; ``OUT/report.html`` (self-contained)
gets the table, a plain statement of what the numbers show (computed from them), learning
curves from the branch point, sample crops, selector maps right after conversion and at the
end, and expert usage. Each run directory (config, checkpoints, log.jsonl, TensorBoard) is
kept under ``OUT/<run>`` (``stage1``, ``plain``, ``switched``, ``condconv``), so ``dynconv
eval|viz|info`` work on them; a rerun replaces them.

On 2 CPU cores the default settings take about 3-4 minutes; on a GPU, larger settings scale
it up, e.g. ``dynconv demo --device cuda --plain-steps 20000 --branch-steps 20000
--channels 64 --data-root ../shared/data/sr`` (T91 for training, Set5 for evaluation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, config_from_dict
from .data import bicubic_resize
from .insight import normalised_entropy, routing_stats, selector_maps, switched_layers
from .metrics import psnr_y, ssim_y
from .models.flops import count_parameters, flops_per_pixel
from .report import Report, array_png, figure_png

#: the hidden layers of the SR net (``body.<i>.conv``): what the branches convert
INCLUDE = ["body.*.conv"]
#: branch -> the trainer's ``convert`` section (``None``: the plain control, not converted)
BRANCHES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "switched": {"to": "switched", "breadth": 8, "selector": "conv1x1", "options": {"routing": "hard", "norm_buffer": 64}},
    "condconv": {"to": "condconv", "breadth": 4, "options": {"routing": "sigmoid"}},
}
CONVERTED = [name for name, c in BRANCHES.items() if c is not None]
LABELS = {"stage1": "plain @ branch point", "plain": "plain (control)", "switched": "switched (converted)",
          "condconv": "condconv (converted)"}
NAMES = {"switched": "Switched", "condconv": "CondConv"}


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    plain_steps: int = 600  # stage 1: the plain net
    branch_steps: int = 1000  # stage 2: every branch, from the same checkpoint
    batch_size: int = 16
    patch_size: int = 64  # HR pixels
    channels: int = 32
    num_layers: int = 5
    scale: int = 2
    lr: float = 2e-3  # stage 1's peak learning rate
    branch_lr: float | None = None  # every branch's peak learning rate (warm restart); None: lr
    breadth: int = 8  # switched experts per layer
    selector: str = "conv1x1"
    device: str = "auto"
    seed: int = 0
    data_root: str | None = None  # a folder with train/T91 and test/Set5 (sr_folder); None: scikit-image photos
    branches: list[str] = field(default_factory=lambda: list(CONVERTED))  # the control always runs
    evals: int = 5  # held-out evaluations per branch (the learning curves' points; the last at its end)
    eval_patch: int | None = None  # None: whole held-out images; else a fixed (seeded) HR crop of each (--quick)

    @property
    def peak_branch_lr(self) -> float:
        return self.lr if self.branch_lr is None else self.branch_lr

    def convert_section(self, name: str) -> dict[str, Any] | None:
        section = BRANCHES[name]
        if section is None:
            return None
        section = json.loads(json.dumps(section))
        if name == "switched":
            section.update(breadth=self.breadth, selector=self.selector)
        return {"step": 0, "include": list(INCLUDE), **section}


@dataclass
class RunResult:
    name: str  # stage1 / plain / switched / condconv
    steps: int  # this run's own steps
    params: int
    flops_per_pixel: float
    train_seconds: float
    psnr_y: float
    ssim_y: float
    per_image: dict[str, dict[str, float]]  # eval image -> {"psnr_y": ...}
    curve: list[tuple[int, float]]  # (own step, training loss)
    evals: list[tuple[int, float]]  # (own step, held-out PSNR-Y)
    conversion: dict[str, Any] | None = None  # what conversion changed at the branch point
    routing: dict[str, Any] | None = None  # switched: training usage / entropy per layer at the end


# ---------------------------------------------------------------------------------- configs
def data_section(s: DemoSettings) -> dict[str, Any]:
    if s.data_root is None:
        return {
            "name": "skimage_sr",
            "options": {"scale": s.scale},
            "train_options": {"patch_size": s.patch_size, "augment": True, "repeat": 64},
            "eval_options": {"patch_size": s.eval_patch, "augment": False},
        }
    return {
        "name": "sr_folder",
        "root": s.data_root,
        "train_split": "train/T91",
        "eval_split": "test/Set5",
        "options": {"scale": s.scale},
        "train_options": {"patch_size": s.patch_size, "augment": True, "repeat": 20},
        "eval_options": {"patch_size": s.eval_patch, "augment": False},
    }


def demo_config(s: DemoSettings, steps: int, lr: float, *, init: str | None = None,
                convert: dict[str, Any] | None = None, evals: int = 1) -> Config:
    """One run: the plain SR net (``init``: start from those weights; ``convert``: the
    trainer's conversion section), ``steps`` steps of cosine from ``lr``, ``evals``
    evaluations spread over the run (the last at its end)."""
    raw: dict[str, Any] = {
        "model": {"name": "sr_plain", "options": {"scale": s.scale, "num_layers": s.num_layers, "channels": s.channels}},
        "data": data_section(s),
        "optim": {"name": "adam", "lr": lr},
        "schedule": {"name": "cosine", "warmup_steps": min(20, steps // 10), "min_lr": lr / 50},
        "losses": [{"name": "l1"}],
        "train": {"steps": steps, "batch_size": s.batch_size, "seed": s.seed, "device": s.device},
        "eval": {"every": max(1, steps // max(evals, 1)), "batch_size": 1, "metrics": ["psnr_y", "ssim_y"]},
        "log": {"every": max(1, steps // 25), "checkpoint_every": steps, "keep_last": 1, "progress": False,
                "tensorboard": True},
    }
    if init is not None:
        raw["model"]["init"] = init
    if convert is not None:
        raw["convert"] = convert
    return config_from_dict(raw)


# --------------------------------------------------------------------------------- training
def read_log(run_dir: Path, batch_size: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float]:
    """Loss curve, held-out PSNR-Y curve and pure training time (evaluation excluded) of the
    run's latest ``start`` in ``log.jsonl``."""
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    events = events[starts[-1]:] if starts else events
    curve, evals, seconds, last = [], [], 0.0, 0
    for event in events:
        if event.get("event") == "train":
            curve.append((event["step"], event["loss"]))
            seconds += (event["step"] - last) * batch_size / max(event["samples_per_s"], 1e-9)
            last = event["step"]
        elif event.get("event") == "eval" and "psnr_y" in event:
            evals.append((event["step"], event["psnr_y"]))
    return curve, evals, seconds


@torch.no_grad()
def outputs_on(model: torch.nn.Module, pairs: list[dict], device: torch.device) -> list[torch.Tensor]:
    """The model's SR output (clamped, on the CPU) for every held-out pair, in eval mode."""
    was = model.training
    model.eval()
    try:
        return [model(p["lr"][None].to(device)).float().clamp(0, 1).cpu() for p in pairs]
    finally:
        model.train(was)


def image_metrics(outputs: list[torch.Tensor], pairs: list[dict], names: list[str], scale: int, *,
                  ssim: bool = True) -> dict[str, dict[str, float]]:
    """PSNR-Y (and SSIM-Y) per held-out image."""
    metrics = {}
    for name, sr, p in zip(names, outputs, pairs):
        metrics[name] = {"psnr_y": float(psnr_y(sr, p["hr"][None], scale)[0])}
        if ssim:
            metrics[name]["ssim_y"] = float(ssim_y(sr, p["hr"][None], scale)[0])
    return metrics


@torch.no_grad()
def routing_snapshot(model: torch.nn.Module, lr_image: torch.Tensor) -> dict[str, Any]:
    """Selector maps of every switched layer on one LR image, and the usage per expert."""
    maps = {k: v[0].cpu() for k, v in selector_maps(model, lr_image).items()}
    breadths = {k: model.get_submodule(k).breadth for k in maps}
    usage = {k: (torch.bincount(m.flatten(), minlength=breadths[k]).double() / m.numel()) for k, m in maps.items()}
    return {"maps": maps, "breadths": breadths, "usage": usage}


@dataclass
class Held:
    """The held-out images: ``{"lr", "hr"}`` pairs and their names."""

    pairs: list[dict]
    names: list[str]


def train_run(s: DemoSettings, name: str, config: Config, held: Held, log) -> tuple[RunResult, torch.nn.Module, dict]:
    """Train one run (converting first when the config has a ``convert`` section); returns
    its result, the trained model and the pictures the report needs."""
    from .train import Trainer

    run_dir = s.out / name
    trainer = Trainer(config, run_dir)
    steps = config.train.steps
    extras: dict[str, Any] = {}
    conversion = None
    if config.convert is not None:
        # convert at the branch point, before the first step (the trainer's staged
        # conversion at step 0) so the state right after conversion can be looked at
        lr0 = held.pairs[0]["lr"][None].to(trainer.device)
        before = outputs_on(trainer.raw, held.pairs, trainer.device)
        params_before = count_parameters(trainer.raw)
        trainer.convert_now()
        after = outputs_on(trainer.raw, held.pairs, trainer.device)
        record = trainer.conversions[-1]
        conversion = {
            "to": record["to"], "converted": list(record["converted"]), "kwargs": record["kwargs"],
            "max_abs_output_change": max(float((a - b).abs().max()) for a, b in zip(after, before)),
            "params_before": params_before, "params_after": count_parameters(trainer.raw),
        }
        if switched_layers(trainer.raw):
            extras["routing_start"] = routing_snapshot(trainer.raw, lr0)
        log(f"[{name}] converted {len(record['converted'])} convs to {record['to']} at the branch point; "
            f"largest change of any held-out output pixel: {conversion['max_abs_output_change']:.2g}")
    log(f"[{name}] training {steps} steps ...")
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    curve, evals, seconds = read_log(run_dir, s.batch_size)
    model = trainer.eval_model()
    outputs = outputs_on(model, held.pairs, trainer.device)
    per_image = image_metrics(outputs, held.pairs, held.names, s.scale, ssim=False)  # the means are the trainer's
    lr_shape = (1, 3, s.patch_size // s.scale, s.patch_size // s.scale)
    routing = None
    if switched_layers(model):
        stats = routing_stats(model)
        routing = {layer: {"usage": v["usage"].tolist(), "entropy": v["entropy"]} for layer, v in stats.items()}
        extras["routing_end"] = routing_snapshot(model, held.pairs[0]["lr"][None].to(trainer.device))
    extras["sample"] = outputs[0][0]
    psnr, ssim = result.metrics["psnr_y"], result.metrics["ssim_y"]
    log(f"[{name}] done in {wall:.1f} s (training {seconds:.1f} s): PSNR-Y {psnr:.2f} dB, SSIM-Y {ssim:.4f}")
    run = RunResult(
        name=name, steps=result.step, params=count_parameters(model), flops_per_pixel=flops_per_pixel(model, lr_shape),
        train_seconds=seconds, psnr_y=psnr, ssim_y=ssim, per_image=per_image, curve=curve, evals=evals,
        conversion=conversion, routing=routing,
    )
    extras["checkpoint"] = result.checkpoint
    return run, model, extras


# -------------------------------------------------------------------------------- the story
def paired_loss_change(curve: list[tuple[int, float]], control: list[tuple[int, float]]) -> tuple[float, int] | None:
    """The relative change of a branch's training loss against the control's over the last
    fifth of the logging windows both have (the same batches, so the comparison is paired):
    ``(mean(loss / control_loss) - 1, steps covered)``, or None without common windows."""
    reference = dict(control)
    common = [(step, loss / reference[step]) for step, loss in curve if reference.get(step)]
    if not common:
        return None
    tail = common[-max(1, len(common) // 5):]
    first = common[-len(tail) - 1][0] if len(common) > len(tail) else 0
    return float(np.mean([ratio for _, ratio in tail]) - 1), tail[-1][0] - first


def verdict(results: dict[str, RunResult], bicubic_psnr: float, s: DemoSettings) -> list[str]:
    """Sentences that say what the measured numbers show (nothing in them is fixed text
    about the outcome: every comparison is computed here)."""
    stage1, control = results["stage1"], results["plain"]
    lines = [
        f"At the branch point ({s.plain_steps} plain steps) the plain net scored {stage1.psnr_y:.2f} dB PSNR-Y "
        f"({stage1.psnr_y - bicubic_psnr:+.2f} dB over bicubic). Trained on for {s.branch_steps} more steps, the "
        f"plain control reached {control.psnr_y:.2f} dB ({control.psnr_y - stage1.psnr_y:+.2f} dB from the branch point)."
    ]
    for name in s.branches:
        r = results[name]
        d_psnr, d_ssim = r.psnr_y - control.psnr_y, r.ssim_y - control.ssim_y
        if abs(d_psnr) < 0.005:
            outcome = f"tied with the plain control ({d_psnr:+.3f} dB PSNR-Y)"
        elif d_psnr > 0:
            outcome = f"beat the plain control by {d_psnr:.2f} dB PSNR-Y"
        else:
            outcome = f"did not beat the plain control: {-d_psnr:.2f} dB PSNR-Y behind it"
        wins = sum(r.per_image[k]["psnr_y"] > control.per_image[k]["psnr_y"] for k in r.per_image)
        flops = r.flops_per_pixel / control.flops_per_pixel
        params = r.params / control.params
        line = (
            f"{NAMES[name]} (converted at the branch point) {outcome} after the same {s.branch_steps} steps from the "
            "same state on the same batches "
            f"(SSIM-Y {d_ssim:+.4f}; higher PSNR on {wins} of {len(r.per_image)} held-out photos), "
            f"at {flops:.2f}x the plain net's active FLOPs per pixel and {params:.1f}x its parameters."
        )
        paired = paired_loss_change(r.curve, control.curve)
        if paired is not None:
            change, steps = paired
            line += (f" On the same batches, its training loss over the last {steps} steps was {abs(change):.1%} "
                     f"{'below' if change < 0 else 'above'} the control's")
            if change < 0 and d_psnr < 0.005:
                line += ": it fitted the training crops better without a held-out gain at this budget."
            else:
                line += "."
        if r.routing:
            entropy = [v["entropy"] for v in r.routing.values()]
            line += (f" Its selectors' routing entropy over the last training steps was {min(entropy):.2f}-"
                     f"{max(entropy):.2f} per layer (1: every expert used equally, 0: one expert for every pixel).")
        lines.append(line)
    lines.append(
        f"One seed, {len(control.per_image)} held-out photos, {s.plain_steps}+{s.branch_steps} steps: a reading of "
        "the method at a tiny budget, not a verdict on it (differences of a few hundredths of a dB are within what "
        "another seed can change)."
    )
    return lines


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


def _curves_figure(results: dict[str, RunResult], s: DemoSettings, bicubic_psnr: float):
    import matplotlib.pyplot as plt

    branch = ["plain", *s.branches]
    colours = {"stage1": "#888888", "plain": "#4c72b0", "switched": "#dd8452", "condconv": "#55a868"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    stage1 = results["stage1"]
    if stage1.curve:
        x, y = zip(*stage1.curve)
        ax.plot(x, y, color=colours["stage1"], label="stage 1 (plain)")
    for name in branch:
        if results[name].curve:
            x, y = zip(*results[name].curve)
            ax.plot([s.plain_steps + v for v in x], y, color=colours[name], label=LABELS[name])
    ax.axvline(s.plain_steps, color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step (dotted: branch point)")
    ax.set_ylabel("training L1 loss")
    ax.set_title("training loss, whole run", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1]
    for name in branch:
        points = [(0, stage1.psnr_y), *results[name].evals]
        x, y = zip(*points)
        ax.plot(x, y, marker="o", ms=3, color=colours[name], label=LABELS[name])
    ax.set_xlabel("steps after the branch point")
    ax.set_ylabel(f"held-out PSNR-Y (dB; bicubic {bicubic_psnr:.2f})")
    ax.set_title("held-out PSNR from the branch point", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[2]
    control = dict(results["plain"].curve)
    for name in s.branches:
        pairs = [(x, y / control[x] - 1) for x, y in results[name].curve if control.get(x)]
        if pairs:
            x, y = zip(*pairs)
            ax.plot(x, [100 * v for v in y], color=colours[name], label=LABELS[name])
    ax.axhline(0, color=colours["plain"], lw=1)
    ax.set_xlabel("steps after the branch point")
    ax.set_ylabel("training loss vs control (%)")
    ax.set_title("paired: same batches as the control", fontsize=10)
    if s.branches:
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _routing_sections(report: Report, extras: dict, result: RunResult, lr_image: torch.Tensor, held_name: str) -> None:
    import matplotlib.pyplot as plt

    from .viz import _expert_colours

    start, end = extras.get("routing_start"), extras["routing_end"]
    report.heading("Selector maps (switched branch, held-out image)")
    report.paragraph(
        f"The expert each output pixel uses in each switched layer on {held_name}, one colour per expert. Right after "
        "conversion every expert holds the same kernel, so whichever the selector picks, the output is the plain "
        "net's; the map then only shows the untrained selector. At the end the experts have been trained on "
        "different pixels."
    )
    for label, snap in (("right after conversion", start), ("at the end", end)):
        if snap is None:
            continue
        items = [(array_png(_to_hwc(lr_image)), "LR input")]
        for layer, selection in snap["maps"].items():
            colours = _expert_colours(snap["breadths"][layer])
            items.append((array_png(colours[selection.numpy()]), f"{layer}, {label}"))
        report.images(items, width=220)

    layers = list(end["maps"])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 2.7), squeeze=False)
    rows = []
    for ax, layer in zip(axes[0], layers):
        breadth = end["breadths"][layer]
        x = np.arange(breadth)
        bars = [("held-out, after conversion", start["usage"][layer] if start else None, "#bbbbbb"),
                ("held-out, at the end", end["usage"][layer], "#dd8452"),
                ("training, recent steps", torch.tensor(result.routing[layer]["usage"]) if result.routing else None, "#4c72b0")]
        bars = [b for b in bars if b[1] is not None]
        width = 0.8 / len(bars)
        for i, (label, usage, colour) in enumerate(bars):
            ax.bar(x - 0.4 + width * (i + 0.5), usage.numpy(), width, label=label, color=colour)
        ax.axhline(1 / breadth, color="k", lw=0.8, ls="--")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("expert")
        row = {"layer": layer}
        if start:
            row["entropy after conversion (held-out)"] = normalised_entropy(start["usage"][layer])
        row["entropy at the end (held-out)"] = normalised_entropy(end["usage"][layer])
        if result.routing:
            row["entropy at the end (training)"] = result.routing[layer]["entropy"]
        row["experts used at the end (held-out)"] = int((end["usage"][layer] > 0).sum())
        rows.append(row)
    axes[0][0].set_ylabel("fraction of pixels")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    report.heading("Expert usage").image(figure_png(fig), "fraction of pixels per expert; dashed: uniform")
    report.paragraph("Normalised routing entropy: 1 = all experts used equally, 0 = one expert takes every pixel.")
    report.table(rows)


def build_report(s: DemoSettings, table: list[dict], story: list[str], results: dict[str, RunResult],
                 extras: dict[str, dict], held: Held, bicubic: torch.Tensor, bicubic_psnr: float) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)

    report = Report(f"dynconv demo: staged training in miniature (x{s.scale} super-resolution)")
    data = "scikit-image's bundled photos" if s.data_root is None else f"{s.data_root} (T91 / Set5)"
    converted = ", ".join(s.branches) or "none"
    report.paragraph(
        f"A plain {s.num_layers}-layer SR net ({s.channels} channels) was trained for {s.plain_steps} steps "
        f"(batch {s.batch_size}, {s.patch_size}px HR crops, L1, Adam {s.lr:g} cosine) on {data}. From that checkpoint, "
        f"each branch trained {s.branch_steps} more steps with the same warm-restarted schedule (Adam "
        f"{s.peak_branch_lr:g} cosine, fresh optimizer state) on the same batches in the same order: the plain net "
        f"unchanged (the control) and the plain net with its hidden convs converted at the branch point "
        f"({converted}; the switched conversion copies each kernel into all {s.breadth} experts, so the outputs are "
        "unchanged at that moment). Involution is not a branch: dynconv.convert has no conversion from a trained "
        f"conv to involution. Evaluation on the held-out images {', '.join(held.names)}"
        f"{'' if s.eval_patch is None else f' ({s.eval_patch}px crops)'} (PSNR/SSIM on Y, {s.scale}px "
        "border shaved). FLOPs/px is the active cost per HR output pixel (a switched conv runs one expert per pixel); "
        "train s is a run's own training wall-clock (a branch's excludes stage 1) on this machine, excluding "
        "evaluation; other load on the machine inflates it."
    )
    report.heading("What the numbers show")
    for line in story:
        report.paragraph(line)
    report.heading("Results").table(table)
    per_image = [{"model": LABELS.get(n, n), **{img: m["psnr_y"] for img, m in r.per_image.items()}} for n, r in results.items()]
    report.paragraph("PSNR-Y (dB) per held-out image:").table(per_image)
    conv_rows = [{"branch": n, "converted layers": len(r.conversion["converted"]),
                  "params before -> after": f"{r.conversion['params_before']:,} -> {r.conversion['params_after']:,}",
                  "largest output change at conversion": f"{r.conversion['max_abs_output_change']:.2g}"}
                 for n, r in results.items() if r.conversion]
    if conv_rows:
        report.paragraph("The conversions at the branch point (output change: largest absolute difference of any "
                         "held-out output pixel, values in [0, 1]):").table(conv_rows)

    report.heading("Learning curves").image(
        figure_png(_curves_figure(results, s, bicubic_psnr)),
        "left: training loss (mean over each logging window); middle: held-out PSNR-Y from the branch point "
        "(step 0 is the shared checkpoint); right: each converted branch's training loss relative to the control's "
        "on the same batches",
    )

    hr = held.pairs[0]["hr"]
    size = min(96, hr.shape[1], hr.shape[2])
    top, left = _crop_box(hr, size)
    window = (slice(None), slice(top, top + size), slice(left, left + size))
    factor = max(1, 256 // size)
    crops = [(array_png(_enlarge(_to_hwc(hr[window]), factor)), "ground truth"),
             (array_png(_enlarge(_to_hwc(bicubic[0][window]), factor)), "bicubic")]
    for name in results:
        crops.append((array_png(_enlarge(_to_hwc(extras[name]["sample"][window]), factor)), LABELS[name]))
    report.heading(f"Sample crops ({held.names[0]}, {size}x{size} HR pixels, enlarged)").images(crops)

    if "switched" in results and "routing_end" in extras["switched"]:
        _routing_sections(report, extras["switched"], results["switched"], held.pairs[0]["lr"], held.names[0])
    return report.write(s.out / "report.html")


# ------------------------------------------------------------------------------------- main
def _steps(r: RunResult, s: DemoSettings) -> str:
    return f"{r.steps:,}" if r.name == "stage1" else f"{s.plain_steps:,}+{r.steps:,}"


def run(s: DemoSettings, log=print) -> dict[str, Any]:
    s.out.mkdir(parents=True, exist_ok=True)
    for name in ("stage1", *BRANCHES):  # a rerun replaces the demo's own run folders (and only those): stale
        if (s.out / name).is_dir():     # checkpoints of a longer run would outrank new ones, logs would append
            shutil.rmtree(s.out / name)
    torch.manual_seed(s.seed)
    total_start = time.perf_counter()
    log(f"dynconv demo: x{s.scale} SR, staged: {s.plain_steps} plain steps, then {s.branch_steps} steps each for "
        f"{', '.join(['plain (control)', *s.branches])} -> {s.out}")

    stage1_config = demo_config(s, s.plain_steps, s.lr)
    from .train import Trainer

    eval_dataset = Trainer(stage1_config, s.out / "stage1", mode="eval").eval_dataset
    names = list(eval_dataset.names) if hasattr(eval_dataset, "names") else [f"image {i}" for i in range(len(eval_dataset))]
    held = Held(pairs=[eval_dataset[i] for i in range(len(eval_dataset))], names=names)

    results: dict[str, RunResult] = {}
    extras: dict[str, dict] = {}
    results["stage1"], _, extras["stage1"] = train_run(s, "stage1", stage1_config, held, log)
    init = str(Path(extras["stage1"]["checkpoint"]).resolve())
    for name in ["plain", *s.branches]:
        config = demo_config(s, s.branch_steps, s.peak_branch_lr, init=init, convert=s.convert_section(name), evals=s.evals)
        results[name], _, extras[name] = train_run(s, name, config, held, log)

    bicubic = [bicubic_resize(p["lr"][None], s.scale).clamp(0, 1) for p in held.pairs]
    bic = image_metrics(bicubic, held.pairs, names, s.scale)
    bic_psnr = float(np.mean([m["psnr_y"] for m in bic.values()]))
    bic_ssim = float(np.mean([m["ssim_y"] for m in bic.values()]))
    control = results["plain"]
    rows = [{"model": "bicubic", "steps": "-", "params": 0, "FLOPs/px": "-", "train s": "-", "PSNR-Y": bic_psnr,
             "SSIM-Y": bic_ssim, "vs bicubic": 0.0, "vs control": bic_psnr - control.psnr_y}]
    for name, r in results.items():
        rows.append({"model": LABELS[name], "steps": _steps(r, s), "params": r.params, "FLOPs/px": round(r.flops_per_pixel),
                     "train s": r.train_seconds, "PSNR-Y": r.psnr_y, "SSIM-Y": r.ssim_y,
                     "vs bicubic": r.psnr_y - bic_psnr, "vs control": r.psnr_y - control.psnr_y})
    story = verdict(results, bic_psnr, s)
    report = build_report(s, [format_row(r) for r in rows], story, results, extras, held, bicubic[0], bic_psnr)
    elapsed = time.perf_counter() - total_start
    table = format_table(rows)
    log("")
    log(table)
    log("")
    for line in story:
        log(line)
    log(f"\nreport: {report}   (total {elapsed:.0f} s)")
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
        "branch_point": init,
        "rows": rows,
        "story": story,
        "results": [{k: v for k, v in r.__dict__.items() if k not in ("curve",)} for r in results.values()],
        "curves": {name: r.curve for name, r in results.items()},
        "bicubic": bic,
        "eval_images": names,
        "report": str(report),
        "seconds": elapsed,
        "torch": torch.__version__,
    }
    (s.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


FORMATS = {"train s": "{:.1f}", "PSNR-Y": "{:.2f}", "SSIM-Y": "{:.4f}", "vs bicubic": "{:+.2f}", "vs control": "{:+.2f}"}


def format_row(row: dict) -> dict[str, str]:
    def cell(column: str, v: Any) -> str:
        if isinstance(v, float):
            return FORMATS.get(column, "{:.4g}").format(v)
        return f"{v:,}" if isinstance(v, int) else str(v)

    return {column: cell(column, v) for column, v in row.items()}


def format_table(rows: list[dict]) -> str:
    """A plain-text table for the console (the report has the HTML one)."""
    columns = list(rows[0])
    cells = [list(format_row(r).values()) for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> DemoSettings:
    p = argparse.ArgumentParser(
        prog="dynconv demo",
        description="Staged training in miniature (x2 SR): a plain net is trained, then from that checkpoint it is "
        "converted to switched convs (and CondConv) and trained on, against the plain net trained on for the same "
        "steps on the same batches. Prints a table and writes OUT/report.html.",
        epilog="examples:\n  dynconv demo                       # CPU, ~3-4 min, scikit-image photos\n"
        "  dynconv demo --quick --out /tmp/d  # a smoke run in seconds\n"
        "  dynconv demo --device cuda --plain-steps 20000 --branch-steps 20000 --channels 64 "
        "--data-root ../shared/data/sr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DemoSettings()
    p.add_argument("--out", type=Path, default=d.out, help="output directory; a rerun replaces its run folders (default: %(default)s)")
    p.add_argument("--plain-steps", type=int, default=d.plain_steps, help="stage 1: plain-net steps (default: %(default)s)")
    p.add_argument("--branch-steps", type=int, default=d.branch_steps,
                   help="stage 2: steps of every branch after the branch point (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="HR training crop (default: %(default)s)")
    p.add_argument("--channels", type=int, default=d.channels, help="the SR net's channels (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--scale", type=int, default=d.scale, choices=(2, 3, 4))
    p.add_argument("--lr", type=float, default=d.lr, help="stage 1's peak learning rate (default: %(default)s)")
    p.add_argument("--branch-lr", type=float, default=None,
                   help="every branch's peak learning rate after the warm restart (default: --lr)")
    p.add_argument("--breadth", type=int, default=d.breadth, help="switched experts per layer (default: %(default)s)")
    p.add_argument("--selector", default=d.selector, choices=("conv1x1", "lambda"))
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-root", default=None, help="folder with train/T91 and test/Set5 (default: scikit-image photos)")
    p.add_argument("--branches", nargs="*", default=d.branches, choices=CONVERTED,
                   help="converted branches beside the plain control (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few steps on small crops: checks the pipeline, not the claims")
    a = p.parse_args(argv)
    s = DemoSettings(out=a.out, plain_steps=a.plain_steps, branch_steps=a.branch_steps, batch_size=a.batch_size,
                     patch_size=a.patch_size, channels=a.channels, num_layers=a.num_layers, scale=a.scale, lr=a.lr,
                     branch_lr=a.branch_lr, breadth=a.breadth, selector=a.selector, device=a.device, seed=a.seed,
                     data_root=a.data_root, branches=list(dict.fromkeys(a.branches)))
    if a.quick:
        s.plain_steps, s.branch_steps, s.batch_size, s.patch_size, s.channels = 4, 4, 4, 32, 8
        s.evals, s.eval_patch = 1, 128
    for name in ("plain_steps", "branch_steps", "batch_size", "patch_size", "channels", "num_layers", "breadth"):
        if getattr(s, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.num_layers < 3:
        p.error(f"--num-layers must be >= 3 (head, at least one hidden layer to convert, tail), got {s.num_layers}")
    if s.patch_size % s.scale:
        p.error(f"--patch-size must be a multiple of --scale ({s.scale}), got {s.patch_size}")
    if not s.peak_branch_lr > 0 or not s.lr > 0:
        p.error("--lr and --branch-lr must be > 0")
    return s


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
