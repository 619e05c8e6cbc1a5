"""``train.stop_on_plateau``: stop a run once an eval metric has stopped improving.

:class:`PlateauRule` sees every evaluation of the run; its state (the reference value, the
evaluations since it last improved, where it stopped) is saved with each checkpoint, so a
resumed run continues the rule exactly where the killed one left it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..config import PlateauConfig

__all__ = ["PlateauRule"]


class PlateauRule:
    """The plateau stop of :class:`~dynconv.config.PlateauConfig` for a metric whose better
    direction is ``mode`` (``'min'`` or ``'max'``).

    ``update(step, value)`` after each evaluation: the value improves when it beats the
    reference by at least ``min_rel_improvement * |reference|``; then it becomes the reference
    and the count of evaluations without improvement restarts. Returns True at the evaluation
    that stops the run (``patience`` in a row without improvement, at or after ``min_steps``);
    :attr:`stopped` then describes the stop.
    """

    def __init__(self, config: PlateauConfig, mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.config = config
        self.mode = mode
        self.reference: float | None = None
        self.reference_step: int | None = None
        self.evals_without_improvement = 0
        self.stopped: dict[str, Any] | None = None

    def _rule(self) -> dict[str, Any]:
        c = self.config
        return {"metric": c.metric, "mode": self.mode, "min_rel_improvement": c.min_rel_improvement,
                "patience": c.patience, "min_steps": c.min_steps}

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the reference by the required relative margin."""
        if not math.isfinite(value):
            return False
        if self.reference is None:
            return True
        margin = self.config.min_rel_improvement * abs(self.reference)
        return value < self.reference - margin if self.mode == "min" else value > self.reference + margin

    def update(self, step: int, value: float) -> bool:
        if self.stopped is not None:
            return False
        if self.improves(value):
            self.reference, self.reference_step, self.evals_without_improvement = float(value), step, 0
        else:
            self.evals_without_improvement += 1
        if self.evals_without_improvement >= self.config.patience and step >= self.config.min_steps:
            self.stopped = {"reason": "plateau", "step": step, "value": float(value), "reference": self.reference,
                            "reference_step": self.reference_step,
                            "evals_without_improvement": self.evals_without_improvement, **self._rule()}
            return True
        return False

    def describe_stop(self) -> str:
        s = self.stopped or {}
        direction = "below" if self.mode == "min" else "above"
        return (f"plateau: eval {s.get('metric')} did not get {s.get('min_rel_improvement', 0):.2%} {direction} "
                f"{s.get('reference')} (step {s.get('reference_step')}) in {s.get('evals_without_improvement')} "
                f"evaluations; stopped at step {s.get('step')} ({s.get('metric')} {s.get('value')})")

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rule": self._rule(), "reference": self.reference, "reference_step": self.reference_step,
                "evals_without_improvement": self.evals_without_improvement, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state; a state saved under another rule (another metric
        or thresholds) is not continued: the rule starts over, with a warning."""
        if not state:
            return
        if state.get("rule") != self._rule():
            warnings.warn(f"train.stop_on_plateau: the checkpoint's plateau state was kept under {state.get('rule')}, "
                          f"not this config's {self._rule()}; the rule starts over")
            return
        self.reference = state.get("reference")
        self.reference_step = state.get("reference_step")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.stopped = state.get("stopped")
