"""Training engine: :class:`Trainer` (HF Accelerate; exact resume, staged conversion,
atomic checkpoints, JSONL/TensorBoard logging) and :func:`evaluate`. See ``docs/training.md``
and ``docs/design/layout.md`` (which module does what)."""

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    newest_intact_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from .evaluation import evaluate_eval_set, evaluate_run
from .experiment import apply_conversion, build_experiment_model, check_config, load_checkpoint_model
from .tasks import METRICS
from .trainer import FitResult, Trainer, TrainingError

evaluate = evaluate_run  # the public name of evaluate_run
build_model = build_experiment_model  # its former name (dynconv.models.build_model builds a model by name)

__all__ = [
    "Trainer",
    "FitResult",
    "TrainingError",
    "CheckpointError",
    "evaluate",
    "evaluate_run",
    "evaluate_eval_set",
    "check_config",
    "build_experiment_model",
    "build_model",
    "apply_conversion",
    "load_checkpoint_model",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "verify_checkpoint",
    "newest_intact_checkpoint",
    "METRICS",
]
