"""A study's numbers: every run's record (``study.json``) and the summary (``results.md``).

Per variant and eval set: mean ± std over seeds; against the baseline, the mean of the
paired differences (same seed) with a 95% Student-t interval over the pairs, and n.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .runner import STATUS_FILE, read_json, read_log, write_json
from .spec import StudyPlan

#: metrics where lower is better (the rest: higher is better)
LOWER_IS_BETTER = {"mse", "l1", "loss"}


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
            for key in ("steps", "train_seconds", "params", "flops_per_pixel", "flops_per", "eval", "checkpoint",
                        "branch_from", "wallclock_match"):
                if key in status:
                    record[key] = status[key]
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


def _values(runs: dict[int, dict[str, Any]], set_name: str, metric: str) -> dict[int, float]:
    return {s: r["eval"][set_name][metric] for s, r in runs.items() if metric in r.get("eval", {}).get(set_name, {})}


def summary(plan: StudyPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{variant: {"n", "params", "flops_per_pixel", "train_seconds", "sets": {set: {metric:
    {"mean", "std", "n", "vs_baseline": {...}}}}}}`` over the finished runs."""
    done = [r for r in records if r["status"] == "done"]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        by_variant.setdefault(r["variant"], []).append(r)
    base_runs = {r["seed"]: r for r in by_variant.get(plan.baseline, [])}
    out: dict[str, Any] = {}
    for variant in plan.variants:
        runs = by_variant.get(variant, [])
        if not runs:
            continue
        entry: dict[str, Any] = {
            "n": len(runs), "seeds": sorted(r["seed"] for r in runs),
            "params": runs[0].get("params"), "flops_per_pixel": runs[0].get("flops_per_pixel"),
            "flops_per": runs[0].get("flops_per"),
            "train_seconds": summarise([r.get("train_seconds", math.nan) for r in runs]),
            "steps": runs[0].get("steps"), "sets": {},
        }
        for set_name in plan.eval_sets:
            metrics: dict[str, Any] = {}
            names = list(dict.fromkeys(k for r in runs for k in r.get("eval", {}).get(set_name, {})))
            for metric in names:
                values = {r["seed"]: r["eval"][set_name][metric] for r in runs if metric in r.get("eval", {}).get(set_name, {})}
                stats = summarise(list(values.values()))
                if variant != plan.baseline:
                    stats["vs_baseline"] = paired_difference(values, _values(base_runs, set_name, metric))
                control = plan.variants[variant].get("control")
                if control:
                    control_runs = {r["seed"]: r for r in by_variant.get(control, [])}
                    stats["vs_control"] = {"control": control, **paired_difference(values, _values(control_runs, set_name, metric))}
                metrics[metric] = stats
            entry["sets"][set_name] = metrics
        out[variant] = entry
    return out


def write_study_json(plan: StudyPlan, path: Path | None = None) -> dict[str, Any]:
    records = collect(plan)
    data = {
        "study": plan.name, "file": str(plan.path), "profile": plan.profile, "baseline": plan.baseline,
        "description": plan.description,
        "eval_sets": {k: str(v) for k, v in plan.eval_sets.items()},
        "variants": plan.variants,
        "environment": environment(),
        "runs": records,
        "summary": summary(plan, records),
    }
    write_json(path or plan.out / "study.json", data)
    return data


# ---------------------------------------------------------------------------------- format
def _decimals(metric: str) -> int:
    """dB to 2 decimals; ratios (SSIM, accuracy), errors and losses to 4."""
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


def fmt_difference(diff: dict[str, Any] | None, decimals: int) -> str:
    if not diff or diff["n"] == 0:
        return "–"
    text = f"{diff['mean']:+.{decimals}f}"
    if diff["n"] > 1:
        text += f" [{diff['low']:+.{decimals}f}, {diff['high']:+.{decimals}f}]"
    return text + f" (n={diff['n']})"


def fmt_seconds(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def results_table(plan: StudyPlan, data: dict[str, Any], set_name: str | None = None) -> list[dict[str, str]]:
    """One row per variant: params, FLOPs/px, steps, train time, per set (or only
    ``set_name``) and metric the mean ± std and the paired difference to the baseline."""
    rows = []
    for variant, entry in data["summary"].items():
        row = {"variant": plan.variants.get(variant, {}).get("label", variant), "n": str(entry["n"]),
               "params": fmt_number(entry["params"]), "FLOPs/px": fmt_number(entry["flops_per_pixel"], 0),
               "steps": fmt_number(entry.get("steps")), "train time": fmt_seconds(entry["train_seconds"]["mean"])}
        for name, metrics in entry["sets"].items():
            if set_name is not None and name != set_name:
                continue
            prefix = "" if set_name is not None else f"{name} "
            for metric, stats in metrics.items():
                if metric == "loss":
                    continue
                d = _decimals(metric)
                row[f"{prefix}{metric}"] = fmt_mean_std(stats, d)
                row[f"{prefix}{metric} Δ"] = "(baseline)" if variant == plan.baseline else fmt_difference(stats.get("vs_baseline"), d)
                if any(info.get("control") for info in plan.variants.values()):
                    vs = stats.get("vs_control")
                    row[f"{prefix}{metric} Δ control"] = f"vs {vs['control']}: {fmt_difference(vs, d)}" if vs else ""
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
        f"Eval sets: {', '.join(f'{k} ({v})' for k, v in data['eval_sets'].items())}.",
        f"Device: {env.get('device')}; torch {env.get('torch')}, dynconv {env.get('dynconv')}, commit {env.get('commit')}.",
        "",
    ]
    for set_name in plan.eval_sets:
        lines += [f"## {set_name}", "", markdown_table(results_table(plan, data, set_name))]
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
