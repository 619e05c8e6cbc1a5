"""Studies: one command runs a comparison over variants x seeds x eval sets.

``load_study(path, profile=...)`` reads and checks a study file into a :class:`StudyPlan`;
``run_study(plan)`` trains what is not finished (resuming what was interrupted), evaluates
every run on every eval set and writes ``study.json``, ``results.md`` and ``report.html``.
See ``docs/studies.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .spec import RunPlan, StudyError, StudyPlan, load_study, parse_seeds
from .runner import StudyOutcome, StudyRunner

__all__ = ["RunPlan", "StudyError", "StudyOutcome", "StudyPlan", "StudyRunner", "load_study", "parse_seeds",
           "run_study", "write_outputs"]


def write_outputs(plan: StudyPlan) -> dict[str, Path]:
    """(Re)write ``study.json``, ``results.md`` and ``report.html`` from the runs on disk."""
    from .report import write_report
    from .results import write_results_md, write_study_json

    data = write_study_json(plan)
    return {"study.json": plan.out / "study.json", "results.md": write_results_md(plan, data),
            "report.html": write_report(plan, data)}


def run_study(plan: StudyPlan, *, progress_every: float = 30.0, echo: Callable[[str], None] | None = None) -> StudyOutcome:
    """Run every unfinished run of ``plan``, then write the outputs."""
    outcome = StudyRunner(plan, progress_every=progress_every, echo=echo).run()
    write_outputs(plan)
    return outcome
