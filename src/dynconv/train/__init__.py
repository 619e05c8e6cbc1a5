"""Training engine: :class:`Trainer` (HF Accelerate; exact resume, staged conversion,
atomic checkpoints, JSONL/TensorBoard logging) and :func:`evaluate`. See ``docs/training.md``."""

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    newest_intact_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from .trainer import (
    METRICS,
    FitResult,
    Trainer,
    TrainingError,
    apply_conversion,
    build_model,
    check_config,
    evaluate,
    load_checkpoint_model,
)

__all__ = [
    "Trainer",
    "FitResult",
    "TrainingError",
    "CheckpointError",
    "evaluate",
    "check_config",
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
