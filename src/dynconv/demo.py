"""The demo job: x2 super-resolution with switched convs on CPU, on scikit-image's bundled photos.

Trains a small switched-conv network (hard routing, breadth 8) and a plain-conv twin with
the same per-pixel FLOPs for the same wall-clock budget on random crops of the training
photos (steps interleaved, so load on a shared machine hits both alike), then - since on CPU
a switched conv computes all its experts and so takes fewer steps in equal time - a plain
twin for the switched net's step count. Evaluates all against bicubic upsampling on the
held-out photos (PSNR, Y channel and RGB), prints a table and writes:

* ``OUT/selector_maps/*.png`` - the held-out LR image beside the expert each pixel used,
  per switched layer, and each layer's usage bar chart;
* ``OUT/comparison.png`` - a held-out crop: bicubic / plain / switched / ground truth;
* ``OUT/summary.json`` - the results table, routing stats (usage and normalised entropy per
  layer) and the run's settings;
* ``OUT/switched.pt``, ``OUT/plain.pt`` - the trained ``state_dict``s.

The photos are read from the files inside the installed ``skimage/data`` folder; nothing is
downloaded. A temporary main job: a later trainer replaces it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .insight import normalised_entropy, routing_stats, selector_maps
from .nn.switched_conv import SwitchedConv2d

# Colour photos shipped inside scikit-image's package folder (no pooch download needed).
# The motorcycle stereo pair shows one scene, so both halves stay on the training side.
TRAIN_IMAGES = ("chelsea.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")
HELDOUT_IMAGES = ("astronaut.png", "coffee.png")
SCALE = 2
EQUAL_STEPS = "plain=steps"  # the plain twin trained for the switched net's step count


# -- data ------------------------------------------------------------------------------------
def load_photo(name: str) -> torch.Tensor:
    """A bundled photo as a float ``(3, H, W)`` tensor in [0, 1], H and W cropped to even."""
    import skimage.data
    import skimage.io

    path = Path(skimage.data.__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is not in the installed scikit-image package; the demo uses only bundled files "
            "and never downloads"
        )
    array = skimage.io.imread(path)[..., :3]
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0
    h, w = image.shape[1:]
    return image[:, : h - h % SCALE, : w - w % SCALE].contiguous()


def downscale(hr: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 3, H/2, W/2)``: antialiased bicubic, clamped to [0, 1]."""
    return F.interpolate(hr, scale_factor=1 / SCALE, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def bicubic_up(lr: torch.Tensor) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)


class CropSampler:
    """Random aligned (LR, HR) crops with flips and 90-degree turns, from a seeded generator."""

    def __init__(self, images: list[torch.Tensor], lr_size: int, batch: int, seed: int) -> None:
        self.hr = images
        self.lr = [downscale(img[None])[0] for img in images]
        self.lr_size = lr_size
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        areas = torch.tensor([img.shape[1] * img.shape[2] for img in images], dtype=torch.float)
        self.weights = areas / areas.sum()  # sample images by area: every pixel equally likely

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, hs = self.lr_size, self.lr_size * SCALE
        lrs, hrs = [], []
        picks = torch.multinomial(self.weights, self.batch, replacement=True, generator=self.gen)
        for i in picks.tolist():
            lr_img, hr_img = self.lr[i], self.hr[i]
            y, x = self._randint(lr_img.shape[1] - s + 1), self._randint(lr_img.shape[2] - s + 1)
            lr = lr_img[:, y : y + s, x : x + s]
            hr = hr_img[:, y * SCALE : y * SCALE + hs, x * SCALE : x * SCALE + hs]
            k = self._randint(4)
            if self._randint(2):
                lr, hr = lr.flip(-1), hr.flip(-1)
            lrs.append(lr.rot90(k, (1, 2)))
            hrs.append(hr.rot90(k, (1, 2)))
        return torch.stack(lrs), torch.stack(hrs)


# -- models ----------------------------------------------------------------------------------
class SRNet(nn.Module):
    """x2 SR: conv head -> ``depth`` x (3x3 conv + ReLU) -> conv -> pixel shuffle, plus the
    bicubic upsampling of the input (the net learns the residual).

    ``switched=True``: the body convs are :class:`SwitchedConv2d` (hard routing, ``breadth``
    experts, a 1x1 conv selector on the head features); otherwise plain ``nn.Conv2d`` with the
    same FLOPs per pixel (switched: one expert per pixel, plus the tiny selector).
    """

    def __init__(self, *, switched: bool, channels: int = 24, depth: int = 3, breadth: int = 8, norm_buffer: int = 32):
        super().__init__()
        self.switched = switched
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        if switched:
            self.body = nn.ModuleList(
                SwitchedConv2d(
                    channels, channels, 3, padding=1, breadth=breadth, routing="hard", norm_buffer=norm_buffer
                )
                for _ in range(depth)
            )
        else:
            self.body = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth))
        self.tail = nn.Conv2d(channels, 3 * SCALE * SCALE, 3, padding=1)
        self.shuffle = nn.PixelShuffle(SCALE)
        with torch.no_grad():  # start close to plain bicubic upsampling
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        head = self.head(lr - 0.5)
        h = head
        for conv in self.body:
            h = F.relu(conv(h, selector_input=head) if self.switched else conv(h))
        return bicubic_up(lr) + self.shuffle(self.tail(h + head))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_lr_pixel(model: SRNet) -> int:
    """Multiply-adds per LR pixel actually needed by the model (one expert per pixel)."""
    total = 0
    for m in model.modules():
        if isinstance(m, SwitchedConv2d):
            total += m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Conv2d):
            total += m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    return total


# -- training and evaluation -----------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float


class Trainer:
    """Adam on L1 loss, one step at a time, with its own clock: the budget is either
    ``seconds`` of this trainer's own step time or exactly ``max_steps`` steps; the learning
    rate follows a cosine over the budget's used fraction."""

    def __init__(self, model: SRNet, sampler: CropSampler, *, lr: float, seconds: float, max_steps: int | None):
        self.model, self.sampler, self.base_lr = model, sampler, lr
        self.budget_seconds, self.max_steps = seconds, max_steps
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.steps, self.seconds, self.recent = 0, 0.0, []
        self._warm_up()

    def _warm_up(self) -> None:
        """One untimed forward/backward on a blank batch, so one-time kernel set-up is not
        charged to the budget. Eval mode: no routing statistics or SwitchNorm history recorded."""
        size = self.sampler.lr_size
        blank = torch.zeros(self.sampler.batch, 3, size, size)
        self.model.eval()
        self.model(blank).sum().backward()
        self.opt.zero_grad(set_to_none=True)

    @property
    def progress(self) -> float:
        return self.steps / self.max_steps if self.max_steps else self.seconds / self.budget_seconds

    @property
    def done(self) -> bool:
        return self.progress >= 1.0

    def step(self) -> None:
        start = time.perf_counter()
        self.model.train()
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * 0.5 * (1 + math.cos(math.pi * min(self.progress, 1.0)))
        lr_batch, hr_batch = self.sampler.sample()
        loss = F.l1_loss(self.model(lr_batch), hr_batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        self.recent = (self.recent + [loss.item()])[-20:]
        self.seconds += time.perf_counter() - start

    def result(self) -> TrainResult:
        return TrainResult(self.steps, self.seconds, float(np.mean(self.recent)) if self.recent else float("nan"))


def train_interleaved(trainers: list[Trainer]) -> list[TrainResult]:
    """Step whichever unfinished trainer has used the least of its budget, until all are done:
    a load spike on a shared machine then slows every model alike, not just the one that
    happens to be training."""
    while True:
        pending = [t for t in trainers if not t.done]
        if not pending:
            return [t.result() for t in trainers]
        min(pending, key=lambda t: t.progress).step()


def to_y(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma in [16/255, 235/255] from RGB in [0, 1] (the usual SR convention)."""
    r, g, b = rgb.unbind(-3)
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def psnr(pred: torch.Tensor, target: torch.Tensor, *, y_channel: bool, border: int = SCALE) -> float:
    """PSNR in dB of images in [0, 1] (``pred`` clamped and rounded to 8 bit), ``border``
    pixels cropped on each side."""
    pred = (pred.clamp(0, 1) * 255).round() / 255
    if y_channel:
        pred, target = to_y(pred), to_y(target)
    if border:
        pred, target = pred[..., border:-border, border:-border], target[..., border:-border, border:-border]
    mse = F.mse_loss(pred.double(), target.double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def evaluate(model: nn.Module | None, images: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per held-out image and averaged: PSNR (Y and RGB) of ``model`` (None: bicubic)."""
    if model is not None:
        model.eval()
    per = {}
    for name, hr in images.items():
        lr = downscale(hr[None])
        pred = bicubic_up(lr) if model is None else model(lr)
        per[name] = {"psnr_y": psnr(pred[0], hr, y_channel=True), "psnr_rgb": psnr(pred[0], hr, y_channel=False)}
    per["mean"] = {k: float(np.mean([v[k] for v in per.values()])) for k in ("psnr_y", "psnr_rgb")}
    return per


def heldout_usage(model: SRNet, lr: torch.Tensor) -> dict[str, dict]:
    """Per switched layer, the fraction of the held-out image's pixels each expert won."""
    out = {}
    for name, selection in selector_maps(model, lr).items():
        breadth = model.get_submodule(name).breadth
        fractions = torch.bincount(selection.flatten(), minlength=breadth).double()
        fractions = fractions / fractions.sum()
        out[name] = {
            "usage": [round(v, 4) for v in fractions.tolist()],
            "entropy": round(normalised_entropy(fractions), 4),
        }
    return out


def save_comparison(models: dict[str, nn.Module], hr: torch.Tensor, path: Path, crop: int) -> None:
    """A centre crop of a held-out image: bicubic, each model, ground truth, with PSNR (Y)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lr = downscale(hr[None])
    panels = [("bicubic", bicubic_up(lr)[0])]
    with torch.no_grad():
        panels += [(name, model.eval()(lr)[0]) for name, model in models.items() if name != EQUAL_STEPS]
    h, w = hr.shape[1:]
    c = min(crop, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.6), dpi=100)
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img.clamp(0, 1)[:, y0 : y0 + c, x0 : x0 + c].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{name}\n{psnr(img, hr, y_channel=True):.2f} dB (Y, whole image)", fontsize=8)
    axes[-1].imshow(hr[:, y0 : y0 + c, x0 : x0 + c].permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[-1].set_title("ground truth", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class CpuShare:
    """The share of ``torch.get_num_threads()`` cores this process got while inside the
    context: near 1 on an idle machine, low when other jobs compete for the CPUs."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "CpuShare":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu

    @property
    def share(self) -> float:
        cores = min(torch.get_num_threads(), os.cpu_count() or 1)
        return self.cpu / max(self.wall * cores, 1e-9)


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<12}{'params':>9}{'MACs/px':>9}{'steps':>7}{'train s':>9}{'PSNR-Y':>9}{'bicubic':>9}{'gain':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<12}{r['params']:>9,}{r['macs_per_lr_pixel']:>9,}{r['train_steps']:>7}"
            f"{r['train_seconds']:>9.1f}{r['psnr_y']:>9.2f}{r['bicubic_psnr_y']:>9.2f}"
            f"{r['psnr_y'] - r['bicubic_psnr_y']:>+7.2f}"
        )
    return "\n".join(lines)


# -- CLI -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.demo",
        description="Train a small switched-conv x2 super-resolution net and a plain-conv twin on CPU "
        "on scikit-image's bundled photos; write PSNR, routing stats and selector maps.",
        epilog="example: python -m dynconv.demo --out runs/demo --seconds 60",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="training wall-clock budget, split equally between the plain and switched nets "
                        "(default: 56; 2 with --quick); then a plain twin trains for the switched net's step count")
    parser.add_argument("--steps", type=int, default=None,
                        help="train each model for exactly this many steps instead of a time budget "
                        "(reproducible; --seconds is then ignored)")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all, for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and crops (default: 0)")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 56.0
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.steps is not None and args.steps <= 0:
        parser.error("--steps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    cpu_share = CpuShare()

    train_images = [load_photo(n) for n in TRAIN_IMAGES]
    heldout = {Path(n).stem: load_photo(n) for n in HELDOUT_IMAGES}
    if args.quick:  # evaluate on a centre crop to keep the test fast
        heldout = {k: v[:, v.shape[1] // 2 - 64 : v.shape[1] // 2 + 64, v.shape[2] // 2 - 64 : v.shape[2] // 2 + 64]
                   for k, v in heldout.items()}
    lr_size, batch = (24, 4) if args.quick else (32, 16)
    per_model_seconds = args.seconds / 2

    bicubic = evaluate(None, heldout)
    models: dict[str, SRNet] = {}
    rows, results = [], {}

    def make_trainer(switched: bool, seconds: float, max_steps: int | None) -> Trainer:
        torch.manual_seed(args.seed)
        model = SRNet(switched=switched)
        sampler = CropSampler(train_images, lr_size, batch, seed=args.seed)  # same crops for every model
        return Trainer(model, sampler, lr=2e-3, seconds=seconds, max_steps=max_steps)

    def record(name: str, trainer: Trainer) -> None:
        result, model = trainer.result(), trainer.model
        scores = evaluate(model, heldout)
        models[name] = model
        results[name] = {"train": result.__dict__, "psnr": scores}
        rows.append({
            "model": name,
            "params": count_params(model),
            "macs_per_lr_pixel": macs_per_lr_pixel(model),
            "train_steps": result.steps,
            "train_seconds": round(result.seconds, 2),
            "final_train_l1": round(result.final_loss, 5),
            "psnr_y": round(scores["mean"]["psnr_y"], 3),
            "psnr_rgb": round(scores["mean"]["psnr_rgb"], 3),
            "bicubic_psnr_y": round(bicubic["mean"]["psnr_y"], 3),
            "bicubic_psnr_rgb": round(bicubic["mean"]["psnr_rgb"], 3),
        })

    plain = make_trainer(False, per_model_seconds, args.steps)
    switched = make_trainer(True, per_model_seconds, args.steps)
    with cpu_share:
        train_interleaved([plain, switched])
    record("plain", plain)
    record("switched", switched)
    step_cost = (switched.seconds / switched.steps) / (plain.seconds / plain.steps)
    if args.steps is None:
        # On CPU a switched conv computes every expert (the dense reference backend), so equal
        # time gives it fewer steps; this twin shows what equal steps (as with a kernel that
        # computes only the chosen expert) would give.
        twin = make_trainer(False, math.inf, switched.steps)
        with cpu_share:
            train_interleaved([twin])
        record(EQUAL_STEPS, twin)
    for name in ("plain", "switched"):
        torch.save(models[name].state_dict(), out / f"{name}.pt")

    switched_model = models["switched"]
    map_name, map_image = next(iter(heldout.items()))
    map_lr = downscale(map_image[None])
    from .viz import save_selector_maps

    written = save_selector_maps(switched_model, map_lr, out / "selector_maps")
    save_comparison(models, map_image, out / "comparison.png", crop=96 if args.quick else 160)

    stats = routing_stats(switched_model)
    routing = {
        layer: {
            "train_recent_usage": [round(v, 4) for v in s["usage"].tolist()],
            "train_recent_entropy": round(s["entropy"], 4),
            "train_steps": s["steps"],
            **({"switchnorm_usage": [round(v, 4) for v in s["switchnorm_usage"].tolist()]}
               if "switchnorm_usage" in s else {}),
        }
        for layer, s in stats.items()
    }
    for layer, s in heldout_usage(switched_model, map_lr).items():
        routing[layer][f"heldout_{map_name}_usage"] = s["usage"]
        routing[layer][f"heldout_{map_name}_entropy"] = s["entropy"]

    table = format_table(rows)
    summary = {
        "task": f"x{SCALE} super-resolution; LR = antialiased bicubic downscale of the photo",
        "psnr": "dB on held-out images, mean over images; Y = BT.601 luma (table), RGB also given; "
        f"{SCALE}-pixel border cropped, predictions clamped and rounded to 8 bit",
        "train_images": list(TRAIN_IMAGES),
        "heldout_images": list(HELDOUT_IMAGES),
        "table": rows,
        "bicubic": bicubic,
        "results": results,
        "routing": routing,
        "selector_maps_image": map_name,
        "selector_maps": [str(p.relative_to(out)) for p in written],
        "settings": {
            "seconds": args.seconds, "steps": args.steps, "quick": args.quick, "seed": args.seed,
            "lr_crop": lr_size, "batch": batch, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cpu_share_during_training": round(cpu_share.share, 3),
        },
        "note": f"plain and switched have equal wall-clock training budgets (interleaved steps); a switched "
        f"step took {step_cost:.1f}x a plain step here (without a fast kernel a switched conv computes all "
        f"{switched_model.body[0].breadth} experts); {EQUAL_STEPS!r} is the plain net trained for the switched "
        "net's step count",
        "switched_step_cost_vs_plain": round(step_cost, 2),
        "wall_seconds": None,
    }
    summary["wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"x{SCALE} SR on held-out {', '.join(heldout)} (PSNR in dB, Y channel, mean over images)")
    print(table)
    print(f"a switched step took {step_cost:.1f}x a plain step here", end="")
    if any(r["model"] == EQUAL_STEPS for r in rows):
        print(f"; {EQUAL_STEPS}: the plain net trained for the switched net's step count", end="")
    print()
    print("routing (held-out image, normalised entropy; 1 = all experts used equally):",
          ", ".join(f"{k} {v[f'heldout_{map_name}_entropy']:.2f}" for k, v in routing.items()))
    if cpu_share.share < 0.7:
        print(f"note: the machine was busy: training got {cpu_share.share:.0%} of {torch.get_num_threads()} "
              "cores' time, so steps per second (and the equal-time rows) are lower than on an idle machine")
    print(f"wrote {out}/summary.json, {len(written)} selector-map PNGs in {out}/selector_maps, "
          f"comparison.png, plain.pt, switched.pt ({summary['wall_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
