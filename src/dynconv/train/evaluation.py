"""Scoring a trained model: :func:`evaluate_run` (a run or checkpoint on its eval split;
``dynconv.train.evaluate`` and ``dynconv eval``) and :func:`evaluate_eval_set` (any folder of
images as a named eval set, ``dynconv eval --eval-set``). The metrics themselves are
:meth:`Trainer.evaluate`'s, so training and evaluation report the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from . import checkpoint as ckpt
from .experiment import load_model_weights, model_cost
from .schedule import restore_annealed
from .trainer import Trainer


def evaluate_run(config_or_run_dir: str | Path | Config, checkpoint: str | Path | None = None, *,
             overrides: list[str] | None = None, max_batches: int | None = None, write: bool = True) -> dict[str, Any]:
    """Score a trained model on the eval split: a run directory (its best checkpoint, else
    the latest), a checkpoint directory, or a config plus ``checkpoint``. Writes
    ``metrics.json`` into the run directory (or next to the checkpoint). Returns
    ``{"metrics": {...}, "checkpoint": path, "step": N}``."""
    if isinstance(config_or_run_dir, Config):
        config, run_dir = config_or_run_dir, None
    else:
        source = Path(config_or_run_dir)
        if source.is_dir() and not (source / "config.yaml").is_file() and checkpoint is None:
            raise FileNotFoundError(f"{source} holds no config.yaml (expected a run directory or a checkpoint directory)")
        if source.is_dir() and ckpt.is_complete(source) and checkpoint is None:
            checkpoint = source
        config = load_config(source, overrides or [])
        run_dir = source if source.is_dir() else None
    if checkpoint is None:
        if run_dir is None:
            raise ValueError("evaluating a config file needs --checkpoint (or pass a run directory)")
        checkpoint = run_dir
    path = ckpt.resolve_checkpoint(checkpoint)
    meta = ckpt.read_meta(path)
    trainer = Trainer(config, run_dir or path.parent, mode="eval", checkpoint=path)
    use_ema = config.train.ema is not None and (path / ckpt.EMA_FILE).is_file()
    weights = path / (ckpt.EMA_FILE if use_ema else ckpt.MODEL_FILE)
    load_model_weights(trainer.raw, ckpt.load_weights(weights, trainer.device), str(weights))
    restore_annealed(trainer.raw, meta.get("annealed"))  # e.g. the temperature of the last step, not the config's
    metrics = trainer.evaluate(max_batches=max_batches)
    result = {"metrics": metrics, "checkpoint": str(path), "step": meta.get("step"), "weights": weights.name,
              "model": config.model.name, "dataset": config.data.name, "split": config.data.eval_split,
              **model_cost(trainer.raw, config)}
    if write and trainer.is_main:
        out_dir = run_dir if run_dir is not None else path.parent
        ckpt.atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(result, indent=2))
        result["written"] = str(Path(out_dir) / "metrics.json")
    return result


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def eval_set_split(folder: str | Path) -> tuple[Path, str]:
    """``(root, split)`` an eval set is read as: a folder is its parent and its name; an
    archive of one (``cifar10-jpeg/test.tar.gz``) is its folder and the name less the suffix,
    which image-folder datasets read from the archive. Raises ``FileNotFoundError`` naming the
    path when it is neither."""
    folder = Path(folder).expanduser().resolve()
    if folder.is_dir():
        return folder.parent, folder.name
    suffix = next((s for s in ARCHIVE_SUFFIXES if folder.name.lower().endswith(s)), None)
    if folder.is_file() and suffix is not None:
        return folder.parent, folder.name[: -len(suffix)]
    raise FileNotFoundError(f"{folder} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive of one")


def evaluate_eval_set(run_dir: str | Path, name: str, folder: str | Path, checkpoint: str | Path | None = None, *,
                      overrides: list[str] | None = None, max_batches: int | None = None,
                      write: bool = True) -> dict[str, Any]:
    """Score a run on any folder of images as eval set ``name`` (SR: a folder of HR images of
    any size, grayscale or RGBA files converted to RGB; classification: ``<class>/<image>``
    folders, or a .tar/.tar.gz of the folder), without editing its config: the run's config
    with the eval split pointed at ``folder``. Writes ``RUN/eval/<name>.json``, one file per
    set, so evaluating one set never overwrites another's results."""
    run_dir, folder = Path(run_dir), Path(folder).expanduser().resolve()
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"eval set name must be a plain file name such as Set5, got {name!r}")
    try:
        root, split = eval_set_split(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"eval set {name!r}: {error}") from None
    # the folder's parent as the split's root and its name as the split: sr_folder reads
    # root/split, image_folder root/split/<class> (or root/split.tar.gz)
    overrides = [*(overrides or []), f"data.eval_options.root={json.dumps(str(root))}",
                 f"data.eval_split={json.dumps(split)}"]
    if load_config(run_dir).data.name == "skimage_sr":  # trained on the bundled photos: read the folder the same way
        overrides.append("data.name=sr_folder")
    result = evaluate_run(run_dir, checkpoint, overrides=overrides, max_batches=max_batches, write=False)
    result.update({"eval_set": name, "folder": str(folder), "split": str(folder)})
    if write:
        out = run_dir / "eval" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out, json.dumps(result, indent=2))
        result["written"] = str(out)
    return result
