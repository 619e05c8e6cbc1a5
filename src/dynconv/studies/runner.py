"""Run a study plan: every variant x seed as an ordinary ``dynconv train`` run, resumable.

Each run is a subprocess ``python -m dynconv train CONFIG --run-dir OUT/runs/<variant>/seed<k>``
(so it holds the run-directory lock, saves on SIGTERM / Ctrl-C and resumes exactly), then
the final checkpoint is evaluated on every eval set into ``RUN/eval/<set>.json``. What a run
ended with is recorded in ``RUN/study_run.json``: a finished run is skipped on a rerun, an
interrupted one resumes from its checkpoint, a failed one is reported and the others go on.

Branches (``branch_from``) start from a copy of the parent's checkpoint at the branch step,
kept under ``OUT/branch_points/`` (the parent is trained to that step first, the copy made,
then the parent continues), so parent and branch share weights, optimizer state, data order
and RNG up to that step. A branch from where its parent ends (``step: final`` / ``plateau``)
starts from a copy of the parent's last checkpoint once the parent has finished; its config
gets the branch step then (``${branch_step}``, ``train.steps`` = branch step + ``more_steps``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .spec import RunPlan, StudyPlan, resolve_branch

STATUS_FILE = "study_run.json"
EVAL_DIR = "eval"
OUTPUT_FILE = "train.out"


@dataclass
class RunOutcome:
    key: str
    status: str  # done | skipped | failed | interrupted
    message: str = ""


@dataclass
class StudyOutcome:
    outcomes: list[RunOutcome] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# ------------------------------------------------------------------------------- helpers
def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    from ..train.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``log.jsonl`` records of its one history (records a resume superseded are
    dropped, see :func:`dynconv.train.logging.read_log`); none if there is no log yet."""
    from ..train.logging import read_log as read_run_log

    try:
        return read_run_log(run_dir)
    except OSError:
        return []


def train_seconds(records: list[dict[str, Any]], up_to_step: int | None = None) -> float:
    """Wall-clock of training from a log: the sum, over each start/resume segment, of the
    time from its first to its last record (a killed segment counts until its last record)."""
    total, seg_start, seg_last = 0.0, None, None
    for r in records:
        if up_to_step is not None and r.get("step", 0) > up_to_step:
            continue
        t = r.get("time")
        if not isinstance(t, (int, float)):
            continue
        if r.get("event") in ("start", "resume"):
            if seg_start is not None and seg_last is not None:
                total += seg_last - seg_start
            seg_start, seg_last = t, t
        elif seg_start is not None:
            seg_last = t
    if seg_start is not None and seg_last is not None:
        total += seg_last - seg_start
    return total


def seconds_per_step(records: list[dict[str, Any]]) -> float | None:
    """Mean seconds per optimizer step between the last segment's train records."""
    trains = [r for r in records if r.get("event") == "train" and isinstance(r.get("time"), (int, float))]
    last_start = max((i for i, r in enumerate(records) if r.get("event") in ("start", "resume")), default=None)
    if last_start is not None:
        start_time = records[last_start].get("time", 0)
        trains = [r for r in trains if r["time"] >= start_time]
    if len(trains) < 2 or trains[-1]["step"] <= trains[0]["step"]:
        return None
    return (trains[-1]["time"] - trains[0]["time"]) / (trains[-1]["step"] - trains[0]["step"])


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def planned_steps(run: RunPlan) -> str:
    """How long ``run`` trains, in words: ``'5,000 steps'`` or ``"pretrain's final step + 800 steps"``."""
    if run.total_steps is not None:
        return f"{run.total_steps:,} steps"
    return f"{run.branch_from.variant}'s {run.branch_from.step} step + {run.branch_from.more_steps:,} steps"


def final_checkpoint(run_dir: Path, steps: int) -> Path | None:
    from ..train import checkpoint as ckpt

    for step, path in reversed(ckpt.list_checkpoints(run_dir / "checkpoints")):
        if step == steps:
            return path
    return None


def run_end(run_dir: Path, steps: int, *, may_stop: bool = False) -> tuple[int, Path, dict[str, Any] | None] | None:
    """``(step, checkpoint, stopped)`` where a finished run ended: its checkpoint of ``steps``
    (its train.steps), or, for a run with a plateau rule (``may_stop``), the last checkpoint
    when that one records the rule's stop (``stopped`` says why); None while it is unfinished.
    (A branch's copy of its parent's plateau checkpoint is not the branch's end.)"""
    from ..train import checkpoint as ckpt

    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        return None
    step, path = found[-1]
    stopped = ckpt.read_meta(path).get("stopped") if may_stop else None
    if stopped:
        return step, path, stopped
    checkpoint = final_checkpoint(run_dir, steps)
    return (steps, checkpoint, None) if checkpoint is not None else None


# -------------------------------------------------------------------------------- runner
class StudyRunner:
    """Runs a :class:`StudyPlan`; ``echo`` receives the progress lines."""

    def __init__(self, plan: StudyPlan, *, progress_every: float = 30.0, echo: Callable[[str], None] | None = None,
                 python: str = sys.executable) -> None:
        self.plan = plan
        self.out = plan.out
        self.progress_every = progress_every
        self.echo = echo or (lambda line: print(line, flush=True))
        self.python = python
        self.child: subprocess.Popen | None = None
        self.stop_requested = False
        self.started = time.time()
        self.done_steps = 0
        self.step_times: dict[str, float] = {}  # variant -> seconds per step

    # -- bookkeeping ----------------------------------------------------------------------------
    def status(self, run: RunPlan) -> dict[str, Any] | None:
        return read_json(run.run_dir / STATUS_FILE)

    def is_finished(self, run: RunPlan) -> bool:
        status = self.status(run)
        return bool(status and status.get("status") == "done" and status.get("config_hash") == run.config_hash
                    and all(name in status.get("eval", {}) for name in self.plan.eval_sets_of(run.variant)))

    def config_path(self, run: RunPlan) -> Path:
        return self.out / "configs" / f"{run.variant}-seed{run.seed}.yaml"

    def branch_point(self, parent: RunPlan, step: int) -> Path:
        return self.out / "branch_points" / parent.variant / f"seed{parent.seed}" / f"step_{step:08d}"

    def _remaining_estimate(self, pending: list[RunPlan]) -> float | None:
        known = list(self.step_times.values())
        if not known:
            return None
        fallback = sum(known) / len(known)
        total = 0.0
        for run in pending:
            branch = run.branch_from
            if branch is not None and branch.more_steps is not None:
                steps = branch.more_steps
            elif branch is not None:
                steps = (run.total_steps or 0) - branch.step
            else:  # a run with a plateau rule may stop earlier: its train.steps is the bound
                steps = run.total_steps or 0
            total += max(steps, 0) * self.step_times.get(run.variant, fallback)
        return total

    # -- the study ------------------------------------------------------------------------------
    def run(self) -> StudyOutcome:
        from ..train.lock import RunDirLock

        self.out.mkdir(parents=True, exist_ok=True)
        outcome = StudyOutcome()
        with RunDirLock(self.out), self._signals():
            write_json(self.out / "plan.json", {
                "study": self.plan.name, "file": str(self.plan.path), "profile": self.plan.profile,
                "baseline": self.plan.baseline, "eval_sets": {k: str(v) for k, v in self.plan.eval_sets.items()},
                "runs": [{"variant": r.variant, "seed": r.seed, "config_hash": r.config_hash, "run_dir": str(r.run_dir)}
                         for r in self.plan.runs],
            })
            failed_parents: set[str] = set()
            runs = self.plan.runs
            for i, run in enumerate(runs):
                if self.stop_requested:
                    outcome.interrupted = True
                    break
                head = f"[{i + 1}/{len(runs)}] {run.key}"
                if run.branch_from is not None and f"{run.branch_from.variant}/seed{run.seed}" in failed_parents:
                    outcome.outcomes.append(RunOutcome(run.key, "failed", f"its parent {run.branch_from.variant}/seed{run.seed} failed"))
                    self.echo(f"{head}: skipped, its parent run failed")
                    continue
                if self.is_finished(run):
                    self._learn_speed(run)
                    outcome.outcomes.append(RunOutcome(run.key, "skipped", "finished earlier"))
                    self.echo(f"{head}: finished earlier, skipped")
                    continue
                eta = self._remaining_estimate(runs[i:])
                self.echo(f"{head}: starting ({planned_steps(run)}; study ETA {_fmt_duration(eta)})")
                try:
                    result = self.run_one(run, head)
                except Exception as error:  # noqa: BLE001 - a failed run is reported, the others go on
                    result = RunOutcome(run.key, "failed", f"{type(error).__name__}: {error}")
                outcome.outcomes.append(result)
                if result.status == "interrupted":
                    outcome.interrupted = True
                    self.echo(f"{head}: interrupted ({result.message}); rerun the same command to resume")
                    break
                if result.status == "failed":
                    failed_parents.add(run.key)
                    write_json(run.run_dir / STATUS_FILE, {"variant": run.variant, "seed": run.seed, "status": "failed",
                                                           "config_hash": run.config_hash, "message": result.message})
                    self.echo(f"{head}: FAILED: {result.message}")
                else:
                    self.echo(f"{head}: done ({result.message})")
        return outcome

    # -- one run -------------------------------------------------------------------------------
    def run_one(self, run: RunPlan, head: str) -> RunOutcome:
        run_dir = run.run_dir
        previous = self.status(run)
        existing = run_dir / "config.yaml"
        if previous and previous.get("config_hash") not in (None, run.config_hash):
            return RunOutcome(run.key, "failed", f"{run_dir} was trained with another config (hash {previous['config_hash']}, "
                                                 f"now {run.config_hash}); use another --out or move that run away")
        if existing.is_file() and not previous:
            try:
                on_disk = yaml.safe_load(existing.read_text())
            except (OSError, yaml.YAMLError):
                on_disk = None
            expected = json.loads(json.dumps(run.config))
            expected.setdefault("log", {})["progress"] = False
            resolved_later = run.match_wallclock is not None or (run.branch_from is not None and not run.branch_from.fixed)
            if on_disk is not None and not resolved_later and _normalise(on_disk) != _normalise(expected):
                return RunOutcome(run.key, "failed", f"{run_dir}/config.yaml differs from this study's config for the run; "
                                                     "use another --out or move that run away")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / STATUS_FILE, {"variant": run.variant, "seed": run.seed, "status": "running",
                                           "config_hash": run.config_hash})
        config = json.loads(json.dumps(run.config))
        config.setdefault("log", {})["progress"] = False  # the study prints its own progress lines
        extra: dict[str, Any] = {}
        if run.match_wallclock is not None:
            config, extra["wallclock_match"] = self._match_wallclock(run, config)
        branch_step = run.branch_from.step if run.branch_from is not None else None
        if run.branch_from is not None and not run.branch_from.fixed:  # where the parent ended
            branch_step, failure = self._branch_step_from_end(run)
            if failure is not None:
                return failure
            config = resolve_branch(config, run.branch_from, branch_step)
        config_file = self.config_path(run)
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        steps = int(config["train"]["steps"])
        # branch children start from the parent's state at the branch step
        if run.branch_from is not None and not (run_dir / "checkpoints").is_dir():
            parent = self.plan.run(run.branch_from.variant, run.seed)
            source = self.branch_point(parent, branch_step)
            if not source.is_dir():
                return RunOutcome(run.key, "failed", f"the branch point {source} is missing (did {parent.key} fail?)")
            shutil.copytree(source, run_dir / "checkpoints" / source.name)
        # the steps at which branches of this run start: stop there, keep a copy, continue
        stops = sorted({r.branch_from.step for r in self.plan.runs if r.branch_from is not None and r.branch_from.fixed
                        and r.branch_from.variant == run.variant and r.seed == run.seed})
        for stop in [*stops, None]:
            if stop is not None and self.branch_point(run, stop).is_dir():
                continue
            status = self._train(run, config_file, head, max_steps=stop, total_steps=steps)
            if status is not None:
                return status
            if stop is not None:
                self._keep_branch_point(run, stop)
        end = run_end(run_dir, steps, may_stop=bool((config.get("train") or {}).get("stop_on_plateau")))
        if end is None:
            return RunOutcome(run.key, "failed", f"no checkpoint of step {steps} (nor a plateau stop) in {run_dir}/checkpoints "
                                                 "after training")
        steps, checkpoint, stopped = end
        if any(r.branch_from is not None and not r.branch_from.fixed and r.branch_from.variant == run.variant
               and r.seed == run.seed for r in self.plan.runs):
            if not self.branch_point(run, steps).is_dir():  # branches from where this run ended start from a copy
                self._keep_branch_point(run, steps)
        evals = self._evaluate(run, checkpoint)
        records = read_log(run_dir)
        seconds = train_seconds(records)
        if run.branch_from is not None:
            parent = self.plan.run(run.branch_from.variant, run.seed)
            seconds += train_seconds(read_log(parent.run_dir), up_to_step=branch_step)
        self._learn_speed(run)
        first = next(iter(evals.values()), {})
        from ..train.speed import training_speed

        status = {"variant": run.variant, "seed": run.seed, "status": "done", "config_hash": run.config_hash,
                  "steps": steps, "checkpoint": str(checkpoint), "train_seconds": seconds,
                  "params": first.get("params"), "flops_per_pixel": first.get("flops_per_pixel"),
                  "flops_per": first.get("flops_per"), "input_size": first.get("input_size"),
                  "eval": {name: result["metrics"] for name, result in evals.items()},
                  "speed": training_speed(records), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        if self.plan.latency_batch_size is not None:
            status["forward"] = self._forward_latency(run, checkpoint, head)
        if stopped:
            status["stopped"] = stopped
        if run.branch_from is not None:
            status["branch_from"] = {"variant": run.branch_from.variant, "step": branch_step}
            if not run.branch_from.fixed:
                status["branch_from"]["at"] = run.branch_from.step  # 'final' / 'plateau': where the parent ended
        write_json(run_dir / STATUS_FILE, status)
        summary = ", ".join(f"{name} " + " ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
                            for name, result in evals.items())
        return RunOutcome(run.key, "done", f"train {_fmt_duration(seconds)}; {summary}")

    def _branch_step_from_end(self, run: RunPlan) -> tuple[int | None, RunOutcome | None]:
        """The step where ``run``'s parent ended (``branch_from.step`` ``final`` / ``plateau``),
        from the parent's finished status; or the outcome that fails the branch."""
        branch = run.branch_from
        parent = self.plan.run(branch.variant, run.seed)
        status = self.status(parent) or {}
        if status.get("status") != "done" or not isinstance(status.get("steps"), int):
            return None, RunOutcome(run.key, "failed", f"its parent {parent.key} has not finished")
        if branch.step == "plateau" and not status.get("stopped"):
            return None, RunOutcome(run.key, "failed", f"branch_from.step is 'plateau' but {parent.key} ran to its "
                                                       f"train.steps ({status['steps']}) without reaching its plateau rule")
        return int(status["steps"]), None

    def _train(self, run: RunPlan, config_file: Path, head: str, *, max_steps: int | None,
               overrides: list[str] = (), run_dir: Path | None = None,
               total_steps: int | None = None) -> RunOutcome | None:
        """One ``dynconv train`` subprocess (resuming when the run has a checkpoint); None if it
        ended normally, else the outcome to report. ``total_steps``: the run's steps as
        resolved for this run (a wall-clock match sets its own), for the progress lines."""
        from ..train import checkpoint as ckpt

        run_dir = run_dir or run.run_dir
        command = [self.python, "-m", "dynconv", "train", str(config_file), "--run-dir", str(run_dir),
                   *[a for o in overrides for a in ("--set", o)]]
        if ckpt.list_checkpoints(run_dir / "checkpoints"):
            command += ["--resume", str(run_dir)]
        if max_steps is not None:
            command += ["--max-steps", str(max_steps)]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / OUTPUT_FILE, "a") as output:
            output.write(f"\n$ {' '.join(command)}\n")
            output.flush()
            self.child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=_child_env())
            last_report = time.time()
            try:
                while self.child.poll() is None:
                    time.sleep(0.5)
                    if time.time() - last_report >= self.progress_every:
                        last_report = time.time()
                        self._progress(run, head, run_dir, total_steps)
            finally:
                code = self.child.wait()
                self.child = None
        if code == 0:
            return None
        if code in (130, 143, -signal.SIGINT, -signal.SIGTERM) or self.stop_requested:
            return RunOutcome(run.key, "interrupted", f"train exited with {code}")
        tail = _tail(run_dir / OUTPUT_FILE)
        return RunOutcome(run.key, "failed", f"train exited with {code}: {tail} (full output: {run_dir / OUTPUT_FILE})")

    def _progress(self, run: RunPlan, head: str, run_dir: Path, total_steps: int | None = None) -> None:
        records = read_log(run_dir)
        trains = [r for r in records if r.get("event") == "train"]
        if not trains:
            return
        last = trains[-1]
        total = total_steps or run.total_steps or last["step"]
        per_step = seconds_per_step(records)
        if per_step:
            self.step_times[run.variant] = per_step
        run_eta = per_step * (total - last["step"]) if per_step else None
        later = self.plan.runs[self.plan.runs.index(run) + 1:]  # the runs after this one still to do
        rest = self._remaining_estimate([r for r in later if not self.is_finished(r)])
        study_eta = (run_eta or 0) + (rest or 0)
        self.echo(f"{head}: step {last['step']:,}/{total:,} loss {last.get('loss', float('nan')):.4g} "
                  f"ETA {_fmt_duration(run_eta)} (study ETA {_fmt_duration(study_eta)})")

    def _learn_speed(self, run: RunPlan) -> None:
        per_step = seconds_per_step(read_log(run.run_dir))
        if per_step:
            self.step_times[run.variant] = per_step

    def _keep_branch_point(self, run: RunPlan, step: int) -> None:
        from ..train import checkpoint as ckpt

        source = run.run_dir / "checkpoints" / ckpt.checkpoint_name(step)
        if not ckpt.is_complete(source):
            raise RuntimeError(f"{run.key}: no checkpoint of step {step} to branch from in {source.parent}")
        target = self.branch_point(run, step)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        os.replace(tmp, target)

    def _match_wallclock(self, run: RunPlan, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Steps for ``run`` so it trains about as long as the matched run (timed on a probe)."""
        match = run.match_wallclock
        status = self.status(run) or {}
        if "wallclock_match" in status:  # chosen before an interruption: keep it
            chosen = status["wallclock_match"]
        else:
            reference = self.plan.run(match.variant, run.seed)
            ref_status = self.status(reference) or {}
            if ref_status.get("status") != "done":
                raise RuntimeError(f"the run to match, {reference.key}, has not finished")
            target = float(ref_status["train_seconds"])
            probe_dir = self.out / "probes" / f"{run.variant}-seed{run.seed}"
            shutil.rmtree(probe_dir, ignore_errors=True)
            probe_config = self.out / "configs" / f"{run.variant}-seed{run.seed}-probe.yaml"
            probe_config.parent.mkdir(parents=True, exist_ok=True)
            probe_config.write_text(yaml.safe_dump(config, sort_keys=False))
            failure = self._train(run, probe_config, f"{run.key} (timing probe)", max_steps=match.probe_steps,
                                  overrides=[f"log.every={max(1, match.probe_steps // 5)}", "eval.every=1000000",
                                             "log.checkpoint_every=1000000", "log.images_every=0"], run_dir=probe_dir)
            if failure is not None:
                raise RuntimeError(f"timing probe failed: {failure.message}")
            per_step = seconds_per_step(read_log(probe_dir))
            if not per_step:
                raise RuntimeError(f"timing probe of {match.probe_steps} steps logged too little to time a step")
            steps = max(int(target / per_step), 1)
            chosen = {"variant": match.variant, "target_seconds": target, "probe_seconds_per_step": per_step, "steps": steps}
            shutil.rmtree(probe_dir, ignore_errors=True)
            write_json(run.run_dir / STATUS_FILE, {**status, "wallclock_match": chosen})
        config = json.loads(json.dumps(config))
        planned = int(config["train"]["steps"] or chosen["steps"])
        config["train"]["steps"] = int(chosen["steps"])
        # warm-up stays the same fraction of the (fewer or more) steps; step milestones are not rescaled
        schedule = config.setdefault("schedule", {})
        if schedule.get("warmup_steps"):
            schedule["warmup_steps"] = int(schedule["warmup_steps"] * chosen["steps"] / planned)
        return config, chosen

    def _evaluate(self, run: RunPlan, checkpoint: Path) -> dict[str, dict[str, Any]]:
        """Evaluate the final checkpoint on every eval set (``RUN/eval/<set>.json``)."""
        from ..train.evaluation import evaluate_eval_set, evaluate_run

        results = {}
        for name, folder in self.plan.eval_sets_of(run.variant).items():
            if folder is None:  # the run's own eval split, every batch of it
                result = evaluate_run(run.run_dir, checkpoint, overrides=["eval.max_batches=null"], write=False)
                result["eval_set"] = name
                write_json(run.run_dir / EVAL_DIR / f"{name}.json", result)
                results[name] = result
            else:
                results[name] = evaluate_eval_set(run.run_dir, name, folder, checkpoint=checkpoint)
        return results

    def _forward_latency(self, run: RunPlan, checkpoint: Path, head: str) -> dict[str, Any]:
        """The final checkpoint's inference forward at the study's ``latency_batch_size``; a
        failed measurement is recorded (``{"error": ...}``) and does not fail the trained run."""
        from ..train.speed import forward_latency

        try:
            return forward_latency(checkpoint, batch_size=self.plan.latency_batch_size)
        except Exception as error:  # noqa: BLE001 - the run itself finished
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            self.echo(f"{head}: forward latency not measured ({message})")
            return {"error": message}

    # -- signals -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """Ctrl-C / SIGTERM: finish the current run's step (it saves), then stop the study."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):
            self.stop_requested = True
            child = self.child
            if child is not None and child.poll() is None and signum == signal.SIGTERM:
                child.send_signal(signal.SIGTERM)  # SIGINT reaches the child through the terminal
            self.echo("study: stopping after the current run saves its checkpoint")

        for s in previous:
            signal.signal(s, stop)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    """A config as ``dynconv train`` writes it (defaults filled), to compare with config.yaml."""
    from ..config import config_from_dict

    try:
        return config_from_dict(config).to_dict()
    except Exception:  # noqa: BLE001 - an unreadable config.yaml simply differs
        return {"unreadable": True}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])
