"""``OUT/report.html`` of a study: the table, metric vs active FLOPs and vs params, learning
curves, and for each variant with switched convs its selector maps on one eval image with
expert usage and routing entropy per layer. Self-contained (figures embedded)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..report import Report, figure_png
from .results import learning_curves, results_table
from .spec import StudyPlan


def _headline_metric(data: dict[str, Any]) -> tuple[str, str] | None:
    """``(eval set, metric)`` the plots use: the first set's first metric other than loss."""
    for entry in data["summary"].values():
        for set_name, metrics in entry["sets"].items():
            for metric in metrics:
                if metric != "loss":
                    return set_name, metric
    return None


def _scatter(plan: StudyPlan, data: dict[str, Any], x_key: str, x_label: str, set_name: str, metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant, entry in data["summary"].items():
        stats = entry["sets"].get(set_name, {}).get(metric)
        x = entry.get(x_key)
        if stats is None or x is None:
            continue
        err = stats["std"] if stats["n"] > 1 and math.isfinite(stats["std"]) else 0.0
        ax.errorbar([x], [stats["mean"]], yerr=[err], fmt="o", capsize=3)
        ax.annotate(plan.variants.get(variant, {}).get("label", variant), (x, stats["mean"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{set_name} {metric}")
    ax.grid(alpha=0.3)
    return figure_png(fig)


def _curves(plan: StudyPlan, data: dict[str, Any], metric: str | None) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, variant in enumerate(plan.variants):
        runs = [r for r in plan.runs if r.variant == variant]
        colour = colours[i % len(colours)]
        for j, run in enumerate(runs):
            parent = plan.run(run.branch_from.variant, run.seed) if run.branch_from else None
            curves = learning_curves(run.run_dir, parent.run_dir if parent else None, _branch_step(run))
            label = plan.variants[variant]["label"] if j == 0 else None
            if curves["train"]:
                steps, losses = zip(*curves["train"])
                axes[0].plot(steps, losses, color=colour, alpha=0.7, lw=1, label=label)
                drawn = True
            points = [(s, m[metric]) for s, m in curves["eval"] if metric and metric in m]
            if points:
                steps, values = zip(*points)
                axes[1].plot(steps, values, color=colour, alpha=0.7, lw=1, marker=".", label=label)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("train loss")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"eval {metric} (training's eval split)" if metric else "eval")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return figure_png(fig)


def _branch_step(run) -> int | None:
    """Where a branch started: its fixed ``branch_from.step``, or (``final`` / ``plateau``) the
    step its study_run.json records once it ran."""
    if run.branch_from is None:
        return None
    if run.branch_from.fixed:
        return run.branch_from.step
    from .runner import STATUS_FILE, read_json

    return ((read_json(run.run_dir / STATUS_FILE) or {}).get("branch_from") or {}).get("step")


def _first_eval_item(config) -> Any:
    """The model input of the first item of ``config``'s eval split (normalised as in training),
    or None when the split cannot be read."""
    from ..models import model_task
    from ..train.experiment import build_split
    from ..train.tasks import TASKS

    try:
        dataset = build_split(config, config.data.eval_split, config.data.eval_options)
        return dataset[0][TASKS[model_task(config.model.name)].input]
    except Exception:  # noqa: BLE001 - no picture is better than no report
        return None


def _switched_insight(plan: StudyPlan, data: dict[str, Any], report: Report, image_folder: Path | None) -> None:
    """Selector maps of each variant's first finished run on one eval image, with the expert
    usage and normalised routing entropy of every switched layer on that image. The image is
    the first of ``image_folder``, or, for a variant whose first eval set is its own eval split
    (``null``), the first item of that split."""
    import torch

    from ..insight import normalised_entropy, selector_maps, switched_layers
    from ..models import model_task
    from ..train.experiment import load_checkpoint_model
    from ..viz import _display_image, _expert_colours

    folder_image = _first_image(image_folder)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {(r["variant"], r["seed"]): r for r in data["runs"] if r["status"] == "done"}
    section_started = False
    for variant in plan.variants:
        record = next((done[k] for k in sorted(done) if k[0] == variant), None)
        if record is None or not record.get("checkpoint"):
            continue
        try:
            model, config, _ = load_checkpoint_model(record["checkpoint"])
        except Exception:  # noqa: BLE001 - a missing checkpoint leaves the section out
            continue
        if not switched_layers(model):
            continue
        own_split = next(iter(plan.eval_sets_of(variant).values()), "") is None
        x = _first_eval_item(config) if own_split else folder_image
        if x is None:
            continue
        if model_task(config.model.name) == "super_resolution" and not own_split:
            from ..data.bicubic import bicubic_resize

            scale = int(config.model.options.get("scale", 2))
            h, w = x.shape[-2:]
            x = bicubic_resize(x[:, : h - h % scale, : w - w % scale][None], 1.0 / scale).clamp(0, 1)[0]
        model.eval()
        maps = selector_maps(model, x[None])
        if not section_started:
            report.heading("Selector maps and expert usage (switched variants, one eval image)")
            report.paragraph("Which expert each pixel uses in each switched layer (one colour per expert), for the "
                             "first finished seed of each variant; usage = share of that image's pixels per expert; "
                             "entropy normalised to 1 = all experts used equally.")
            section_started = True
        n = len(maps)
        fig, axes = plt.subplots(2, n + 1, figsize=(2.6 * (n + 1), 5.2), squeeze=False)
        axes[0][0].imshow(_display_image(x))
        axes[0][0].set_title("input", fontsize=8)
        axes[1][0].axis("off")
        rows = []
        for k, (name, selection) in enumerate(maps.items(), start=1):
            breadth = model.get_submodule(name).breadth
            colours = _expert_colours(breadth)
            axes[0][k].imshow(colours[selection[0].cpu().numpy()], interpolation="nearest")
            axes[0][k].set_title(name, fontsize=8)
            usage = torch.bincount(selection[0].flatten().cpu(), minlength=breadth).double()
            usage = usage / usage.sum().clamp_min(1)
            axes[1][k].bar(range(breadth), usage.numpy(), color=colours)
            axes[1][k].axhline(1 / breadth, color="k", lw=0.8, ls="--")
            entropy = normalised_entropy(usage)
            axes[1][k].set_title(f"entropy {entropy:.2f}", fontsize=8)
            rows.append({"layer": name, "breadth": breadth, "experts used": int((usage > 0).sum()),
                         "max share": f"{usage.max().item():.2f}", "entropy": f"{entropy:.3f}"})
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        report.paragraph(f"{plan.variants[variant]['label']} (seed {record['seed']})")
        report.image(figure_png(fig))
        report.table(rows)


def _first_image(folder: Path | None):
    if folder is None or not folder.is_dir():
        return None
    from ..data.images import image_to_tensor, list_image_files, ImageRef

    files = list_image_files(folder)
    if not files:
        return None
    ref = ImageRef(source=str(files[0]), path=files[0])
    return image_to_tensor(ref.decode()).float() / 255.0


def write_report(plan: StudyPlan, data: dict[str, Any], path: Path | None = None) -> Path:
    report = Report(f"Study {plan.name}" + (f" ({plan.profile})" if plan.profile else ""))
    if plan.description:
        report.paragraph(plan.description.strip())
    env = data["environment"]
    done = sum(r["status"] == "done" for r in data["runs"])
    report.paragraph(f"{done} of {len(data['runs'])} runs finished. Baseline: {plan.baseline}. Device: {env.get('device')}; "
                     f"torch {env.get('torch')}, dynconv {env.get('dynconv')}, commit {env.get('commit')}.")
    report.heading("Results")
    report.paragraph("Mean ± std over seeds; Δ: mean paired difference to the baseline (same seeds) with its 95% "
                     "t interval and the number of pairs.")
    for set_name in plan.eval_sets:
        report.paragraph(set_name)
        report.table(results_table(plan, data, set_name))
    headline = _headline_metric(data)
    if headline is not None:
        set_name, metric = headline
        report.heading(f"{set_name} {metric} against cost")
        report.images([
            (_scatter(plan, data, "flops_per_pixel", "active FLOPs per pixel (log)", set_name, metric), "vs active FLOPs"),
            (_scatter(plan, data, "params", "parameters (log)", set_name, metric), "vs parameters"),
        ])
    curves = _curves(plan, data, headline[1] if headline else None)
    if curves is not None:
        report.heading("Learning curves")
        report.paragraph("Training loss and the periodic evaluation on the training config's eval split, per run; "
                         "branches include their parent's steps before the branch point.")
        report.image(curves)
    first_set = next((folder for folder in plan.eval_sets.values() if folder is not None), None)
    _switched_insight(plan, data, report, first_set)
    return report.write(path or plan.out / "report.html")
