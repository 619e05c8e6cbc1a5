"""Figures of docs/results/vqvae.md from a VQ-VAE study's output directory.

    python tools/vqvae_figures.py ~/studies/vqvae-cpu -o docs/results \
        --images ../shared/data/cifar10-jpeg/test.tar.gz

- ``vqvae_curves.png``: per data set, from the branch point on (the author's "loss after
  the conversion" plot): the training loss (mse + commitment) of every branch of seed 0, all
  from the same checkpoint and data order; and the periodic eval loss as the change against
  (a) of the same seed, mean over the seeds both have, with the claimed -20% marked.
- ``vqvae_selector_maps.png``: a few eval images, their reconstruction by (a), and the
  expert each pixel of the decoder's highest-resolution switched conv
  (``decoder.upsample2.conv``) picks in (b) and in (b) with the selector input detached,
  final checkpoints of seed 0. Images are fed as in training (``data.options`` mean / std).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LAYER = "decoder.upsample2.conv"
MAP_VARIANTS = {"switched_lambda": "(b)", "switched_lambda_detach": "(b) detached"}


def _events(run_dir: Path, kind: str, since: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == kind and r["step"] >= since]


def _mean_curve(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return np.array(steps), np.array([np.mean([c[s] for c in curves]) for s in steps])


def loss_curves(study: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in study["runs"] if r.get("status") == "done" and r.get("branch_from")]
    datasets = sorted({r["variant"].split("/")[0] for r in runs})
    fig, axes = plt.subplots(2, len(datasets), figsize=(6.5 * len(datasets), 7.5), dpi=100, squeeze=False)
    for col, dataset in enumerate(datasets):
        by_variant: dict[str, dict[int, dict]] = defaultdict(dict)
        for run in runs:
            if run["variant"].startswith(dataset + "/"):
                by_variant[run["variant"]][run["seed"]] = run

        def curve(run: dict, kind: str, key: str) -> dict[int, float]:
            start = run["branch_from"]["step"]
            return {e["step"] - start: e[key] for e in _events(Path(run["run_dir"]), kind, start) if key in e}

        control = by_variant.get(f"{dataset}/plain", {})
        for variant, members in sorted(by_variant.items(), key=lambda kv: (not kv[0].endswith("/plain"), kv[0])):
            name = study["variants"].get(variant, {}).get("label", variant).split(" (")[0]
            style = {"color": "k", "lw": 2.0} if variant.endswith("/plain") else {"lw": 1.2}
            if 0 in members:  # top: training loss of seed 0, every variant from the same checkpoint
                steps, values = _mean_curve([curve(members[0], "train", "loss")])
                if len(values) >= 5:  # a 5-point running mean of the logged 50-step means
                    values, steps = np.convolve(values, np.ones(5) / 5, mode="valid"), steps[2:-2]
                axes[0, col].plot(steps, values, label=name, **style)
            # bottom: eval loss relative to (a) of the same seed, mean over the seeds both have
            paired = [s for s in members if s in control]
            if not paired:
                continue
            ratios = []
            for seed in paired:
                mine, base = curve(members[seed], "eval", "mse_plus_commitment"), curve(control[seed], "eval", "mse_plus_commitment")
                ratios.append({k: 100 * (mine[k] / base[k] - 1) for k in mine if k in base})
            steps, values = _mean_curve(ratios)
            axes[1, col].plot(steps, values, label=f"{name} (n={len(paired)})", marker="o", ms=3, **style)
        label = study["variants"].get(f"{dataset}/plain", {}).get("label", dataset)
        title = label.split("(")[-1].rstrip(")") if "(" in label else dataset
        axes[0, col].set_title(f"{title}: training loss, seed 0 (running mean of 50-step means)", fontsize=9)
        axes[0, col].set_ylabel("mse + commitment")
        axes[1, col].set_title(f"{title}: eval mse + commitment vs (a), same seed (periodic eval subset)", fontsize=9)
        axes[1, col].set_ylabel("change vs (a), %")
        axes[1, col].axhline(-20, color="grey", ls="--", lw=0.8)
        axes[1, col].text(0, -20, " the claim: -20%", fontsize=7, va="bottom", color="grey")
        for ax in axes[:, col]:
            ax.set_xlabel("steps after the branch point (the conversion)")
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=7)
        axes[1, col].legend(fontsize=7)
    fig.tight_layout()
    path = out / "vqvae_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _images_from(source: Path, count: int) -> list[tuple[str, torch.Tensor]]:
    """``count`` images (float [0, 1], (3, H, W)), one per class folder where possible."""
    picked: list[tuple[str, bytes]] = []
    if source.is_file():
        with tarfile.open(source) as tar:
            seen = set()
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 2 and parts[-2] not in seen:
                    seen.add(parts[-2])
                    picked.append((f"{parts[-2]}/{parts[-1]}", tar.extractfile(member).read()))
                if len(picked) == count:
                    break
    else:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:count]
        picked = [(p.name, p.read_bytes()) for p in files]
    images = []
    for name, data in picked:
        array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
        images.append((name, torch.from_numpy(array).permute(2, 0, 1)))
    return images


def selector_maps_figure(study: dict, images: list[tuple[str, torch.Tensor]], dataset: str, out: Path,
                         variants: dict[str, str] = MAP_VARIANTS, layer: str = LAYER) -> Path:
    """Rows: ``images``; columns: the image, (a)'s reconstruction, and per ``variants``
    (name -> column title) the expert each pixel of ``layer`` picks (seed 0, final checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynconv.insight import selector_maps
    from dynconv.train.experiment import input_normalisation, load_checkpoint_model
    from dynconv.viz import selector_map_image

    runs = {r["variant"]: r for r in study["runs"] if r.get("seed") == 0 and r.get("status") == "done"}
    models = {}
    for variant in ["plain", *variants]:
        run = runs.get(f"{dataset}/{variant}")
        if run is not None:
            model, config, _ = load_checkpoint_model(Path(run["checkpoint"]))
            models[variant] = (model.eval(), config)
    mean, std = input_normalisation(next(iter(models.values()))[1])
    columns = ["input"] + (["(a) reconstruction"] if "plain" in models else []) + [
        f"{variants[v]}: expert per pixel" for v in variants if v in models]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.2 * len(images)), dpi=100,
                             squeeze=False)
    for row, (name, image) in enumerate(images):
        x = ((image - mean) / std if mean is not None else image)[None]
        cells = [image.permute(1, 2, 0).numpy()]
        if "plain" in models:
            with torch.no_grad():
                out_image = models["plain"][0](x)["reconstruction"][0]
            restored = out_image * std + mean if mean is not None else out_image
            cells.append(restored.clamp(0, 1).permute(1, 2, 0).numpy())
        for variant in variants:
            if variant in models:
                model = models[variant][0]
                selection = selector_maps(model, x)[layer][0]
                cells.append(selector_map_image(selection, model.get_submodule(layer).breadth).permute(1, 2, 0).numpy())
        for col, cell in enumerate(cells):
            axes[row, col].imshow(cell, interpolation="nearest")
            axes[row, col].axis("off")
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=8)
        axes[row, 0].text(-2, image.shape[1] / 2, name, fontsize=6, rotation=90, va="center", ha="right")
    fig.suptitle(f"{layer} (the decoder's highest-resolution conv), final checkpoints, seed 0; one colour per expert",
                 fontsize=8)
    fig.tight_layout()
    path = out / "vqvae_selector_maps.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_tables(study: dict) -> str:
    """Per eval set: each variant's params, active FLOPs / pixel, train time (a branch's: after
    its branch point), eval metrics
    (mean ± std over seeds) and the paired relative change of mse + commitment against (a):
    mean ± std over seeds and the 95% t interval (study.json's ``vs_baseline.relative``)."""
    runs = [r for r in study["runs"] if r.get("status") == "done"]
    lines = []
    for set_name in study["eval_sets"]:
        lines += [f"**{set_name}**", "",
                  "| variant | n | params | FLOPs/px | train time | MSE | commitment | MSE + commitment "
                  "| Δ vs (a): mean ± std | 95% interval | PSNR (dB) | perplexity | dead codes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        scored = [r for r in runs if set_name in r.get("eval", {})]
        for variant in dict.fromkeys(r["variant"] for r in scored):
            members = {r["seed"]: r for r in scored if r["variant"] == variant}
            control = {r["seed"]: r for r in scored if r["variant"] == study["variants"][variant]["baseline"]}

            def stat(metric: str, digits: int, scale: float = 1.0) -> str:
                values = np.array([m["eval"][set_name][metric] for m in members.values()]) * scale
                text = f"{values.mean():.{digits}f}"
                return text + (f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else "")

            total = "mse_plus_commitment"
            changes = [100 * (members[s]["eval"][set_name][total] / control[s]["eval"][set_name][total] - 1)
                       for s in members if s in control]
            relative = study["summary"].get(variant, {}).get("sets", {}).get(set_name, {}).get(total, {}).get(
                "vs_baseline", {}).get("relative", {})
            if variant == study["variants"][variant]["baseline"]:
                change, interval = "(baseline)", ""
            else:
                change = f"{np.mean(changes):+.1f}%" + (f" ± {np.std(changes, ddof=1):.1f}" if len(changes) > 1 else "")
                interval = (f"[{100 * relative['low']:+.1f}%, {100 * relative['high']:+.1f}%]"
                            if relative.get("n", 0) > 1 else "")
            first = next(iter(members.values()))
            parent = (first.get("branch_from") or {}).get("variant")
            # a branch's train_seconds include its parent's: show the time after the branch point
            parents = {r["seed"]: r["train_seconds"] for r in runs if r["variant"] == parent}
            minutes = np.mean([m["train_seconds"] - parents.get(seed, 0.0) for seed, m in members.items()]) / 60
            label = study["variants"][variant]["label"].rsplit(" (", 1)[0]
            lines.append(
                f"| {label} | {len(members)} | {first['params']:,} | {first['flops_per_pixel']:,.0f} "
                f"| {minutes:.1f} min | {stat('mse', 5, 1)} | {stat('commitment', 5)} "
                f"| {stat(total, 5)} | {change} | {interval} | {stat('psnr', 2)} | {stat('codebook_perplexity', 0)} "
                f"| {stat('dead_codes', 0)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, help="the study's --out directory (holds study.json)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, help="a folder of images or a .tar.gz of class folders (CIFAR-10 test)")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--dataset", default="cifar10", help="the data set whose runs draw the selector maps")
    parser.add_argument("--tables", action="store_true", help="also print the result tables (markdown)")
    args = parser.parse_args()
    study = json.loads((args.study_dir / "study.json").read_text())
    if args.tables:
        print(markdown_tables(study))
    args.out.mkdir(parents=True, exist_ok=True)
    print(loss_curves(study, args.out))
    if args.images is not None:
        print(selector_maps_figure(study, _images_from(args.images, args.count), args.dataset, args.out))


if __name__ == "__main__":
    main()
