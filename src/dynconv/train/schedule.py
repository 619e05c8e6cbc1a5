"""Learning-rate schedules as a pure function of the optimizer step.

The factor multiplies each param group's base learning rate; keeping it a function of the
step (no hidden state) makes resuming and rebuilding the optimizer after a staged
conversion trivial: the trainer sets ``group['lr']`` before every optimizer step.
"""

from __future__ import annotations

import bisect
import math

from ..config import ScheduleConfig


def lr_factor(schedule: ScheduleConfig, step: int, total_steps: int, base_lr: float) -> float:
    """Multiplier of ``base_lr`` for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up over ``warmup_steps`` (from 1/(warmup+1) to 1), then
    ``constant``; ``cosine`` from 1 down to ``min_lr / base_lr`` at the last step; or
    ``step``: times ``gamma`` at each of ``milestones``.
    """
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / (schedule.warmup_steps + 1)
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return schedule.gamma ** bisect.bisect_right(schedule.milestones, step)
    # cosine
    span = max(total_steps - schedule.warmup_steps - 1, 1)
    progress = min(max(step - schedule.warmup_steps, 0) / span, 1.0)
    floor = schedule.min_lr / base_lr if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, schedule: ScheduleConfig, step: int, total_steps: int) -> float:
    """Set every param group's ``lr`` from its ``initial_lr`` for ``step``; return group 0's lr."""
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", group["lr"])
        group["lr"] = base * lr_factor(schedule, step, total_steps, base)
    return optimizer.param_groups[0]["lr"]
