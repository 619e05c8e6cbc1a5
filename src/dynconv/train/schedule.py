"""Learning-rate schedules and annealed layer attributes as pure functions of the optimizer step.

The factor multiplies each param group's base learning rate; keeping it a function of the
step (no hidden state) makes resuming and rebuilding the optimizer after a staged
conversion trivial: the trainer sets ``group['lr']`` before every optimizer step. Annealed
attributes (``anneal``: Dynamic Convolution's softmax temperature) work the same way: set on
the layers before every step, so a resumed run or a freshly converted layer gets the value
of the step. They are not weights, so a checkpoint's meta records them for evaluation.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
from typing import Mapping, Sequence

from torch import nn

from ..config import AnnealConfig, ConfigError, ScheduleConfig


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


# ---------------------------------------------------------------------- annealed attributes
def anneal_value(anneal: AnnealConfig, step: int, steps_per_epoch: int) -> float:
    """The value for optimizer step ``step`` (0-based): ``start`` at step 0, linear to ``end``
    at step ``steps`` (or ``epochs * steps_per_epoch``), ``end`` from then on."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    length = anneal.steps if anneal.steps is not None else anneal.epochs * steps_per_epoch
    return anneal.start + (anneal.end - anneal.start) * min(step / length, 1.0)


def annealed_layers(model: nn.Module, anneal: AnnealConfig) -> dict[str, nn.Module]:
    """``{name: module}`` that ``anneal`` sets: modules whose name matches ``include`` and that
    have the attribute; the outermost only (a CondConv2d, not also its router inside)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # parents come before their children
        if any(outer == "" or name.startswith(outer + ".") for outer in found):
            continue
        if hasattr(module, anneal.attribute) and any(fnmatch.fnmatchcase(name, p) for p in anneal.include):
            found[name] = module
    return found


def _log_key(anneals: Sequence[AnnealConfig], index: int) -> str:
    attribute = anneals[index].attribute
    shared = sum(a.attribute == attribute for a in anneals) > 1
    return f"anneal/{attribute}[{index}]" if shared else f"anneal/{attribute}"


def set_annealed(model: nn.Module, anneals: Sequence[AnnealConfig], step: int, steps_per_epoch: int) -> dict[str, float]:
    """Set each anneal's attribute for ``step`` on its layers; returns ``{log key: value}``
    (``anneal/temperature``, or ``anneal/temperature[i]`` when several anneal it)."""
    values = {}
    for i, anneal in enumerate(anneals):
        value = anneal_value(anneal, step, steps_per_epoch)
        for module in annealed_layers(model, anneal).values():
            setattr(module, anneal.attribute, value)
        values[_log_key(anneals, i)] = value
    return values


def annealed_state(model: nn.Module, anneals: Sequence[AnnealConfig]) -> dict[str, dict[str, float]]:
    """``{module name: {attribute: value now}}`` of every annealed layer (a checkpoint's meta)."""
    state: dict[str, dict[str, float]] = {}
    for anneal in anneals:
        for name, module in annealed_layers(model, anneal).items():
            state.setdefault(name, {})[anneal.attribute] = float(getattr(module, anneal.attribute))
    return state


def restore_annealed(model: nn.Module, state: Mapping[str, Mapping[str, float]] | None) -> None:
    """Put back what :func:`annealed_state` recorded (evaluating a checkpoint: the values of
    its last step, not the config's initial ones)."""
    for name, attributes in (state or {}).items():
        module = model.get_submodule(name)
        for attribute, value in attributes.items():
            setattr(module, attribute, value)


def check_anneal_targets(model: nn.Module, anneals: Sequence[AnnealConfig], *, conversion_pending: bool) -> None:
    """An anneal that sets nothing is a config mistake (a temperature on a plain ResNet):
    raise :class:`ConfigError` naming ``anneal[i].include``, unless a staged conversion is
    still to add layers (``conversion_pending``)."""
    if conversion_pending:
        return
    for i, anneal in enumerate(anneals):
        if not annealed_layers(model, anneal):
            raise ConfigError(f"anneal[{i}].include", f"no layer matching {anneal.include} has the attribute "
                              f"{anneal.attribute!r} (e.g. CondConv2d with routing softmax has a temperature)")
