"""A study's numbers: every run's record (``study.json``) and the summary (``results.md``).

Per variant and eval set: mean ± std over seeds; against the baseline, the mean of the
paired differences (same seed) with a 95% Student-t interval over the pairs, and n; and the
same for the relative change (``value / baseline - 1`` per seed), which results.md shows when
the study sets ``relative_change: true``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

from .runner import STATUS_FILE, read_json, read_log, write_json
from .spec import StudyPlan

#: how results name an eval set without a folder (``null`` in the study file)
OWN_EVAL_SPLIT = "each run's own eval split, every batch"


def environment() -> dict[str, str]:
    """Device, versions and commit of this process (where the study was run from)."""
    import torch

    from .. import __version__ as dynconv_version
    from ..bench.common import environment as bench_environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = bench_environment(device)
    env["dynconv"] = dynconv_version
    return env


def collect(plan: StudyPlan) -> list[dict[str, Any]]:
    """Every planned run's record: its ``study_run.json`` (status, metrics per eval set, params,
    FLOPs, wall-clock) plus its config hash; runs not yet done have ``status`` pending."""
    records = []
    for run in plan.runs:
        status = read_json(run.run_dir / STATUS_FILE) or {}
        record = {"variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir),
                  "config_hash": run.config_hash, "status": status.get("status", "pending")}
        if status.get("config_hash") not in (None, run.config_hash):
            record["status"] = "stale"  # made by another version of the study file
        elif record["status"] == "done":
            for key in ("steps", "train_seconds", "params", "flops_per_pixel", "flops_per", "input_size", "eval", "checkpoint",
                        "branch_from", "wallclock_match", "speed", "forward"):
                if key in status:
                    record[key] = status[key]
            if "stopped" in status:  # ended early by its train.stop_on_plateau rule
                record["stopped"] = status["stopped"]
        elif "message" in status:
            record["message"] = status["message"]
        records.append(record)
    return records


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarise(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = statistics.stdev(values) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std}


def summarise_present(values: list[Any]) -> dict[str, Any] | None:
    """:func:`summarise` of the values that are numbers (a measurement some runs lack); None if none is."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return summarise(numbers) if numbers else None


def _speed_entry(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's speed and size over its runs: seconds per epoch, training peak memory,
    forward ms (with what it was measured on) and FLOPs per image (classifiers)."""
    speed = [r.get("speed") or {} for r in runs]
    forward = [r.get("forward") or {} for r in runs]
    measured = next((f for f in forward if "ms" in f), None)
    first = runs[0]
    size = first.get("input_size")
    per_image = (first["flops_per_pixel"] * size[1] * size[2]
                 if first.get("flops_per") == "input pixel" and first.get("flops_per_pixel") and size else None)
    return {"seconds_per_epoch": summarise_present([s.get("seconds_per_epoch") for s in speed]),
            "peak_memory_mib": summarise_present([s.get("peak_memory_mib") for s in speed]),
            "forward_ms": summarise_present([f.get("ms") for f in forward]),
            "forward": {k: measured.get(k) for k in ("batch_size", "device_name", "precision", "channels_last", "repeats")}
            if measured else None,
            "flops_per_image": per_image}


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Mean of ``value - baseline`` over the seeds both have, with a 95% t interval."""
    seeds = sorted(set(values) & set(baseline))
    diffs = [values[s] - baseline[s] for s in seeds]
    out = {"n": len(diffs), "seeds": seeds, "mean": math.nan, "low": math.nan, "high": math.nan}
    if diffs:
        out["mean"] = sum(diffs) / len(diffs)
    if len(diffs) > 1:
        half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def paired_relative_change(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Mean of ``value / baseline - 1`` over the seeds both have (a fraction: -0.2 is 20% below
    the baseline, whichever direction is better), with a 95% t interval; seeds whose baseline
    value is 0 or not finite have no relative change and are left out."""
    usable = {s: b for s, b in baseline.items() if isinstance(b, (int, float)) and math.isfinite(b) and b != 0}
    return paired_difference({s: v / abs(usable[s]) for s, v in values.items() if s in usable},
                             {s: b / abs(b) for s, b in usable.items()})


def _values(runs: dict[int, dict[str, Any]], set_name: str, metric: str) -> dict[int, float]:
    return {s: r["eval"][set_name][metric] for s, r in runs.items() if metric in r.get("eval", {}).get(set_name, {})}


def summary(plan: StudyPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{variant: {"n", "params", "flops_per_pixel", "train_seconds", "sets": {set: {metric:
    {"mean", "std", "n", "vs_baseline": {...}}}}}}`` over the finished runs."""
    done = [r for r in records if r["status"] == "done"]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        by_variant.setdefault(r["variant"], []).append(r)
    out: dict[str, Any] = {}
    for variant in plan.variants:
        runs = by_variant.get(variant, [])
        if not runs:
            continue
        baseline = plan.baseline_of(variant)  # with data sets: the baseline of this one's
        base_runs = {r["seed"]: r for r in by_variant.get(baseline, [])}
        entry: dict[str, Any] = {
            "n": len(runs), "seeds": sorted(r["seed"] for r in runs),
            "params": runs[0].get("params"), "flops_per_pixel": runs[0].get("flops_per_pixel"),
            "flops_per": runs[0].get("flops_per"),
            "train_seconds": summarise([r.get("train_seconds", math.nan) for r in runs]),
            "steps": runs[0].get("steps"), "sets": {}, **_speed_entry(runs),
        }
        for set_name in plan.eval_sets_of(variant):
            metrics: dict[str, Any] = {}
            names = list(dict.fromkeys(k for r in runs for k in r.get("eval", {}).get(set_name, {})))
            for metric in names:
                values = {r["seed"]: r["eval"][set_name][metric] for r in runs if metric in r.get("eval", {}).get(set_name, {})}
                stats = summarise(list(values.values()))
                if variant != baseline:
                    reference = _values(base_runs, set_name, metric)
                    stats["vs_baseline"] = {**paired_difference(values, reference),
                                            "relative": paired_relative_change(values, reference)}
                control = plan.variants[variant].get("control")
                if control:
                    control_runs = {r["seed"]: r for r in by_variant.get(control, [])}
                    reference = _values(control_runs, set_name, metric)
                    stats["vs_control"] = {"control": control, **paired_difference(values, reference),
                                           "relative": paired_relative_change(values, reference)}
                metrics[metric] = stats
            entry["sets"][set_name] = metrics
        out[variant] = entry
    return out


def write_study_json(plan: StudyPlan, path: Path | None = None) -> dict[str, Any]:
    records = collect(plan)
    data = {
        "study": plan.name, "file": str(plan.path), "profile": plan.profile, "baseline": plan.baseline,
        "description": plan.description,
        "eval_sets": {k: str(v) if v is not None else None for k, v in plan.eval_sets.items()},
        "variants": plan.variants,
        "environment": environment(),
        "runs": records,
        "summary": summary(plan, records),
    }
    write_json(path or plan.out / "study.json", data)
    return data


# ---------------------------------------------------------------------------------- format
def _decimals(metric: str) -> int:
    """dB to 2 decimals; counts (dead codes) to 0, perplexities to 1; squared errors and the
    VQ-VAE's losses (about 1e-3 once trained) to 6; ratios (SSIM, accuracy), L1 and losses to 4."""
    if metric == "dead_codes":
        return 0
    if metric.endswith("perplexity"):
        return 1
    if metric in ("mse", "commitment", "mse_plus_commitment"):
        return 6
    return 2 if metric.startswith("psnr") else 4


def fmt_number(value: Any, decimals: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:,.{decimals}f}"


def fmt_mean_std(stats: dict[str, Any], decimals: int) -> str:
    mean = fmt_number(stats["mean"], decimals)
    if stats["n"] > 1 and math.isfinite(stats["std"]):
        return f"{mean} ± {fmt_number(stats['std'], decimals)}"
    return mean


def _fmt_paired(diff: dict[str, Any] | None, fmt: Callable[[float], str]) -> str:
    """A paired difference as ``mean [low, high] (n=k)``, each number written by ``fmt``."""
    if not diff or diff["n"] == 0:
        return "–"
    text = fmt(diff["mean"])
    if diff["n"] > 1:
        text += f" [{fmt(diff['low'])}, {fmt(diff['high'])}]"
    return text + f" (n={diff['n']})"


def fmt_difference(diff: dict[str, Any] | None, decimals: int) -> str:
    return _fmt_paired(diff, lambda value: f"{value:+.{decimals}f}")


def fmt_relative(diff: dict[str, Any] | None) -> str:
    """A paired relative change as ``-12.3% [-15.1%, -9.5%] (n=3)``."""
    return _fmt_paired(diff, lambda value: f"{value:+.1%}")


def fmt_seconds(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _speed_columns(plan: StudyPlan, summary: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per variant the size and speed columns that some variant has: FLOPs/image, s/epoch with
    its ratio to its baseline's, forward ms at the measured batch, training peak memory."""
    def has(key: str) -> bool:
        return any(entry.get(key) for entry in summary.values())

    batch = next((e["forward"]["batch_size"] for e in summary.values() if e.get("forward")), None)
    columns: dict[str, dict[str, str]] = {}
    for variant, entry in summary.items():
        base_epoch = (summary.get(plan.baseline_of(variant), {}).get("seconds_per_epoch") or {}).get("mean")
        row = columns[variant] = {}
        if has("flops_per_image"):
            row["FLOPs/image"] = f"{entry['flops_per_image'] / 1e6:,.1f}M" if entry.get("flops_per_image") else "–"
        if has("seconds_per_epoch"):
            epoch = entry.get("seconds_per_epoch")
            ratio = f" ({epoch['mean'] / base_epoch:.2f}x)" if epoch and base_epoch else ""
            row["s/epoch"] = f"{fmt_number(epoch['mean'], 1)}{ratio}" if epoch else "–"
        if has("forward_ms"):
            row[f"fwd ms (b{batch})"] = fmt_mean_std(entry["forward_ms"], 2) if entry.get("forward_ms") else "–"
        if has("peak_memory_mib"):
            row["peak MiB"] = fmt_number(entry["peak_memory_mib"]["mean"], 0) if entry.get("peak_memory_mib") else "–"
    return columns


def results_table(plan: StudyPlan, data: dict[str, Any], set_name: str | None = None) -> list[dict[str, str]]:
    """One row per variant: params, FLOPs/px, steps, train time, the speed columns some variant
    has (FLOPs/image, s/epoch and its ratio to the baseline, forward ms, peak memory), per set
    (or only ``set_name``) and metric the mean ± std and the paired difference to the baseline."""
    rows = []
    speed = _speed_columns(plan, data["summary"])
    for variant, entry in data["summary"].items():
        if set_name is not None and set_name not in entry["sets"]:
            continue  # another data set's variant
        row = {"variant": plan.variants.get(variant, {}).get("label", variant), "n": str(entry["n"]),
               "params": fmt_number(entry["params"]), "FLOPs/px": fmt_number(entry["flops_per_pixel"], 0),
               "steps": fmt_number(entry.get("steps")), "train time": fmt_seconds(entry["train_seconds"]["mean"]),
               **speed[variant]}
        for name, metrics in entry["sets"].items():
            if set_name is not None and name != set_name:
                continue
            prefix = "" if set_name is not None else f"{name} "
            shown = [m for m in plan.metrics if m in metrics] if plan.metrics else [m for m in metrics if m != "loss"]
            for metric in shown:
                stats = metrics[metric]
                d = _decimals(metric)
                delta = "Δ%" if plan.relative_change else "Δ"

                def difference(diff: dict[str, Any] | None) -> str:
                    return fmt_relative((diff or {}).get("relative")) if plan.relative_change else fmt_difference(diff, d)

                row[f"{prefix}{metric}"] = fmt_mean_std(stats, d)
                row[f"{prefix}{metric} {delta}"] = ("(baseline)" if variant == plan.baseline_of(variant)
                                                    else difference(stats.get("vs_baseline")))
                if any(info.get("control") for info in plan.variants.values()):
                    vs = stats.get("vs_control")
                    row[f"{prefix}{metric} {delta} control"] = f"vs {vs['control']}: {difference(vs)}" if vs else ""
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_no finished runs yet_\n"
    columns = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r.get(c, "") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results_md(plan: StudyPlan, data: dict[str, Any], path: Path | None = None) -> Path:
    env = data["environment"]
    done = sum(r["status"] == "done" for r in data["runs"])
    lines = [f"# Study `{plan.name}`" + (f" (profile `{plan.profile}`)" if plan.profile else ""), ""]
    if plan.description:
        lines += [plan.description.strip(), ""]
    lines += [
        f"{done} of {len(data['runs'])} runs finished. Baseline: `{plan.baseline}`. Mean ± std over seeds (n = seeds); "
        "Δ = mean paired difference to the baseline over the seeds both have, with its 95% t interval.",
        f"Eval sets: {', '.join(f'{k} ({v or OWN_EVAL_SPLIT})' for k, v in data['eval_sets'].items())}.",
        f"Device: {env.get('device')}; torch {env.get('torch')}, dynconv {env.get('dynconv')}, commit {env.get('commit')}.",
        *_speed_notes(data["summary"], plan.baseline),
        "",
    ]
    for set_name in plan.eval_sets:
        lines += [f"## {set_name}", "", markdown_table(results_table(plan, data, set_name))]
    lines += _comparison_notes(plan, data)
    failed = [r for r in data["runs"] if r["status"] in ("failed", "stale")]
    if failed:
        lines += ["Runs that did not finish:", ""]
        lines += [f"- `{r['variant']}/seed{r['seed']}`: {r['status']} {r.get('message', '')}" for r in failed]
        lines.append("")
    notes = [f"- `{v}`: {info['description']}" for v, info in plan.variants.items() if info.get("description")]
    if notes:
        lines += ["Variants:", "", *notes, ""]
    path = path or plan.out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _speed_notes(summary: dict[str, Any], baseline: str) -> list[str]:
    """What the speed columns mean and what they were measured on (only for columns shown)."""
    notes = []
    if any(e.get("seconds_per_epoch") for e in summary.values()):
        notes.append(f"s/epoch: the median training step (no evaluation or saving) x steps per epoch, each run on its "
                     f"own device; (Nx): ratio to `{baseline}`; a branch is timed after its branch point.")
    forward = next((e["forward"] for e in summary.values() if e.get("forward")), None)
    if forward:
        notes.append(f"fwd ms: median of {forward['repeats']} inference forwards at batch {forward['batch_size']} on "
                     f"{forward['device_name']} ({forward['precision']}{', channels_last' if forward['channels_last'] else ''}).")
    if any(e.get("peak_memory_mib") for e in summary.values()):
        notes.append("peak MiB: the training process's peak of allocated CUDA tensors.")
    return notes


def learning_curves(run_dir: Path, parent_dir: Path | None = None, branch_step: int | None = None) -> dict[str, list]:
    """``{"train": [(step, loss)], "eval": [(step, {metric: value})]}`` from ``log.jsonl``;
    a branch gets its parent's records up to the branch step first. Records a resumed run
    repeated after a kill are kept once (the last value per step)."""
    records = []
    if parent_dir is not None and branch_step is not None:
        records += [r for r in read_log(parent_dir) if r.get("step", 0) <= branch_step]
    records += read_log(run_dir)
    train: dict[int, float] = {}
    evals: dict[int, dict[str, float]] = {}
    for r in records:
        if r.get("event") == "train" and "loss" in r:
            train[r["step"]] = r["loss"]
        elif r.get("event") == "eval":
            evals[r["step"]] = {k: v for k, v in r.items() if k not in ("event", "step", "time") and isinstance(v, (int, float))}
    return {"train": sorted(train.items()), "eval": sorted(evals.items())}


def _comparison_notes(plan: StudyPlan, data: dict[str, Any]) -> list[str]:
    """What the Δ columns are (relative change, the metrics' directions) and where each
    branch started and each run with a plateau rule stopped."""
    from ..train.tasks import METRICS

    notes = [f"Data set `{name}` ({info['label']}): {info['description']}" for name, info in plan.datasets.items()
             if info.get("description")]
    if plan.relative_change:
        notes.append("Δ% = mean over the seeds both have of (value / baseline's value - 1), with its 95% t interval: "
                     "negative is lower than the baseline, whichever direction is better.")
    shown = {m for entry in data["summary"].values() for metrics in entry["sets"].values() for m in metrics}
    lower = sorted(m for m in shown if m in METRICS and METRICS[m][1] == "min")
    if lower:
        notes.append(f"Lower is better: {', '.join(lower)}; higher is better: the others.")
    for r in data["runs"]:
        if r.get("stopped"):
            s = r["stopped"]
            notes.append(f"`{r['variant']}/seed{r['seed']}` stopped on its plateau rule at step {s.get('step')} "
                         f"({s.get('metric')} {s.get('value'):.6g}; no {s.get('min_rel_improvement', 0):.2%} improvement on "
                         f"{s.get('reference'):.6g} from step {s.get('reference_step')} in {s.get('evals_without_improvement')} evaluations).")
        branch = r.get("branch_from") or {}
        if branch.get("at"):
            notes.append(f"`{r['variant']}/seed{r['seed']}` branched from `{branch['variant']}` at its {branch['at']} step "
                         f"{branch['step']}.")
    return ["Notes:", "", *[f"- {n}" for n in notes], ""] if notes else []
