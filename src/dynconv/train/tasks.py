"""What differs between the three tasks, in one place: which batch key a model reads, what its
output is scored against, the default metrics, and the eval metrics (name, the tasks it
applies to, whether higher is better, and how it is computed per example from
:mod:`dynconv.metrics`).

The trainer, :func:`~dynconv.train.experiment.check_config` and the model cost read these
tables instead of branching on the task name. Eval metrics are registered in
:data:`EVAL_METRICS` (a :class:`dynconv.registry.Registry`); :data:`METRICS` is the public
``name -> (tasks, mode)`` view of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import metrics as M
from ..registry import Registry


@dataclass(frozen=True)
class Task:
    """One task: batch keys, output wrapping, defaults.

    ``unit_range``: outputs are images in [0, 1] (super-resolution): predictions are clamped to
    it before scoring, PSNR's data range is 1 and samples are shown as they are; otherwise
    PSNR's range is that of the batch's targets and samples are rescaled per image."""

    name: str
    input: str  # the batch key the model reads
    output: str  # the key a plain tensor output is wrapped under
    target: str  # the batch key predictions are scored against
    metrics: tuple[str, ...]  # default eval.metrics; the first picks the best checkpoint
    flops_per: str  # which pixels flops_per_pixel divides by (dynconv.models.flops)
    sample_tags: tuple[str, str] | None = None  # TensorBoard tags of (prediction, target) samples
    unit_range: bool = False

    def wrap(self, out: Any) -> dict:
        """The model's output as a dict (plain tensors under :attr:`output`)."""
        return {self.output: out} if isinstance(out, torch.Tensor) else out

    def scored(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, target)`` in float32, the prediction clamped to [0, 1] for image tasks."""
        pred, target = outputs[self.output].float(), batch[self.target].float()
        return (pred.clamp(0, 1) if self.unit_range else pred), target

    def sample_images(self, outputs: dict, batch: dict) -> list[tuple[str, torch.Tensor]]:
        """``[(tag, (3, H, W) image)]`` of the first example: the prediction and its target."""
        if self.sample_tags is None:
            return []
        from ..viz import display_tensor

        pred, target = outputs[self.output][0], batch[self.target][0]
        images = (pred.clamp(0, 1), target) if self.unit_range else (display_tensor(pred), display_tensor(target))
        return list(zip(self.sample_tags, images))


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("classification", input="image", output="logits", target="label", metrics=("accuracy",),
         flops_per="input pixel"),
    Task("super_resolution", input="lr", output="sr", target="hr", metrics=("psnr_y", "ssim_y"),
         flops_per="HR output pixel", sample_tags=("samples/output", "samples/target"), unit_range=True),
    Task("reconstruction", input="image", output="reconstruction", target="image", metrics=("psnr", "mse"),
         flops_per="reconstructed pixel", sample_tags=("samples/reconstruction", "samples/input")),
)}

# ---------------------------------------------------------------------------------- metrics
#: eval metrics by name: ``fn(task, outputs, batch) -> (N,)`` float64, one value per example;
#: metadata ``tasks`` (the tasks it applies to) and ``mode`` ('max' if higher is better)
EVAL_METRICS = Registry("metric", meta={"tasks": None, "mode": ("max", "min")})
_IMAGE_TASKS = ("super_resolution", "reconstruction")


class _Directions(Mapping):
    """``METRICS[name] == (tasks, mode)``: a read-only view of :data:`EVAL_METRICS`' metadata."""

    def __getitem__(self, name: str) -> tuple[tuple[str, ...], str]:
        if name not in EVAL_METRICS:
            raise KeyError(name)
        meta = EVAL_METRICS.meta(name)
        return meta["tasks"], meta["mode"]

    def __iter__(self) -> Iterator[str]:
        return iter(EVAL_METRICS)

    def __len__(self) -> int:
        return len(EVAL_METRICS)


#: metric -> (tasks it applies to, 'max' if higher is better else 'min')
METRICS: Mapping[str, tuple[tuple[str, ...], str]] = _Directions()


@EVAL_METRICS.register("accuracy", tasks=("classification",), mode="max")
def _accuracy(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    return M.topk_correct(outputs["logits"], batch["label"]).double()


@EVAL_METRICS.register("top5", tasks=("classification",), mode="max")
def _top5(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    return M.topk_correct(outputs["logits"], batch["label"], k=5).double()


def _scale(batch: dict) -> int:
    """The SR scale of a batch: the border psnr_y / ssim_y shave."""
    return max(int(batch["hr"].shape[-1] // batch["lr"].shape[-1]), 0)


@EVAL_METRICS.register("psnr_y", tasks=("super_resolution",), mode="max")
def _psnr_y(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    return M.psnr_y(*task.scored(outputs, batch), shave=_scale(batch)).double()


@EVAL_METRICS.register("ssim_y", tasks=("super_resolution",), mode="max")
def _ssim_y(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    return M.ssim_y(*task.scored(outputs, batch), shave=_scale(batch)).double()


@EVAL_METRICS.register("psnr", tasks=_IMAGE_TASKS, mode="max")
def _psnr(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    pred, target = task.scored(outputs, batch)
    data_range = 1.0 if task.unit_range else float(target.max() - target.min()) or 1.0
    return M.psnr(pred, target, data_range=data_range)


@EVAL_METRICS.register("mse", tasks=_IMAGE_TASKS, mode="min")
def _mse(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    return M.reconstruction_mse(*task.scored(outputs, batch)).double()


@EVAL_METRICS.register("l1", tasks=_IMAGE_TASKS, mode="min")
def _l1(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    return M.mean_absolute_error(*task.scored(outputs, batch)).double()


def _per_batch(task: Task, outputs: dict, batch: dict, key: str) -> torch.Tensor:
    """A model output that is one value per batch (a VQ-VAE's), repeated for each example."""
    value = outputs.get(key)
    return torch.full((batch[task.input].shape[0],), float("nan") if value is None else float(value), dtype=torch.float64)


@EVAL_METRICS.register("perplexity", tasks=("reconstruction",), mode="max")
def _perplexity(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    """The VQ-VAE's codebook perplexity of each eval batch, averaged (depends on the eval batch
    size; ``codebook_perplexity`` is that of the whole eval set)."""
    return _per_batch(task, outputs, batch, "perplexity")


@EVAL_METRICS.register("commitment", tasks=("reconstruction",), mode="min")
def _commitment(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    """The VQ-VAE's commitment loss (already weighted by its ``commitment_cost``, as in the
    training loss), averaged over the eval batches."""
    return _per_batch(task, outputs, batch, "commitment_loss")


@EVAL_METRICS.register("mse_plus_commitment", tasks=("reconstruction",), mode="min")
def _mse_plus_commitment(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    """Reconstruction MSE plus commitment loss: a VQ-VAE's training objective with unit weights,
    whatever the config's loss weights (the loss the switched-conv VQ-VAE claim is about)."""
    return _mse(task, outputs, batch) + _commitment(task, outputs, batch)


@dataclass(frozen=True)
class EvalSetMetric:
    """A metric of the whole eval set that is not a mean of per-example values (how many codes
    the set never uses). ``statistic(task, outputs, batch) -> Tensor`` of a fixed shape is summed
    over the batches and ranks; ``finish(total) -> float`` turns the sum into the value."""

    statistic: Callable[[Task, dict, dict], torch.Tensor]
    finish: Callable[[torch.Tensor], float]

    def __call__(self, task: Task, outputs: dict, batch: dict) -> torch.Tensor:
        raise NotImplementedError("an eval-set metric has no per-example value: Trainer.evaluate sums its statistic")


def _code_counts(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    counts = outputs.get("code_counts")
    if counts is None:
        raise KeyError("codebook_perplexity / dead_codes need a VQ-VAE's outputs['code_counts']")
    return counts.detach().to(torch.float64).cpu()


def _perplexity_of_counts(total: torch.Tensor) -> float:
    probs = total / total.sum().clamp_min(1.0)
    return float(torch.exp(-(probs * torch.log(probs.clamp_min(1e-300))).sum()))


EVAL_METRICS.register("codebook_perplexity", EvalSetMetric(_code_counts, _perplexity_of_counts),
                      tasks=("reconstruction",), mode="max")
EVAL_METRICS.register("dead_codes", EvalSetMetric(_code_counts, lambda total: float((total == 0).sum())),
                      tasks=("reconstruction",), mode="min")


@EVAL_METRICS.register("loss", tasks=tuple(TASKS), mode="min")
def _loss(task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    raise NotImplementedError("'loss' is the weighted training loss: Trainer.evaluate computes it from the loss terms")


def metrics_for(task: str) -> list[str]:
    """The metric names that apply to ``task``."""
    return sorted(name for name in EVAL_METRICS if task in EVAL_METRICS.meta(name)["tasks"])


def per_example_metric(name: str, task: Task, outputs: dict, batch: dict) -> torch.Tensor:
    """Metric ``name`` per example ``(N,)`` (float64); ``loss`` is the trainer's, and an
    :class:`EvalSetMetric` has none (see :func:`eval_set_metric`)."""
    return EVAL_METRICS.get(name)(task, outputs, batch)


def eval_set_metric(name: str) -> EvalSetMetric | None:
    """The :class:`EvalSetMetric` registered as ``name``, or None for a per-example metric."""
    metric = EVAL_METRICS.get(name)
    return metric if isinstance(metric, EvalSetMetric) else None
