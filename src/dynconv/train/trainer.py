"""The training engine: HF Accelerate, exact resume, staged conversion, checkpoints, logging.

``Trainer(config, run_dir).fit()`` trains; :func:`evaluate` scores a run or checkpoint.
See ``docs/training.md`` for the run directory layout and the guarantees.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError, ConvertConfig, load_config, save_config
from . import checkpoint as ckpt
from .ema import EMA
from .grad_checkpoint import enable_block_checkpointing
from .lock import RunDirLock
from .logging import RunLogger, count_records_after, record_run_start
from .schedule import set_lr

TASK_INPUT = {"classification": "image", "super_resolution": "lr", "reconstruction": "image"}
DEFAULT_METRICS = {
    "classification": ["accuracy"],
    "super_resolution": ["psnr_y", "ssim_y"],
    "reconstruction": ["psnr", "mse"],
}
# metric -> (tasks it applies to, 'max' if higher is better else 'min')
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "accuracy": (("classification",), "max"),
    "top5": (("classification",), "max"),
    "psnr_y": (("super_resolution",), "max"),
    "ssim_y": (("super_resolution",), "max"),
    "psnr": (("super_resolution", "reconstruction"), "max"),
    "mse": (("super_resolution", "reconstruction"), "min"),
    "l1": (("super_resolution", "reconstruction"), "min"),
    "perplexity": (("reconstruction",), "max"),
    "loss": (("classification", "super_resolution", "reconstruction"), "min"),
}


class TrainingError(RuntimeError):
    """Training stopped (e.g. a NaN/inf loss); the message names the step and the checkpoint."""


@dataclass
class FitResult:
    step: int
    total_steps: int
    interrupted: bool = False
    checkpoint: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    signal: str | None = None  # 'SIGINT' or 'SIGTERM' when a signal interrupted the run


# ---------------------------------------------------------------------------- registries
def _registries():
    from .. import data, losses, models  # noqa: F401  (importing registers the built-ins)

    return models, data, losses


def _accepted(fn) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_config(config: Config, *, training: bool = True) -> str:
    """Check every name and option of ``config`` against the registries, before anything is
    built; raise :class:`ConfigError` naming the key path. Returns the model's task."""
    models, data, losses = _registries()
    if config.model.name not in models.MODELS:
        raise ConfigError("model.name", f"unknown model {config.model.name!r}; expected one of {sorted(models.MODELS)}")
    accepted = models.model_options(config.model.name)
    for key in config.model.options:
        if key not in accepted:
            raise ConfigError(f"model.options.{key}", f"unknown option of model {config.model.name!r}; expected one of {sorted(accepted)}")
    _check_model_values(config)
    task = models.model_task(config.model.name)
    if config.data.name not in data.DATASETS:
        raise ConfigError("data.name", f"unknown dataset {config.data.name!r}; expected one of {sorted(data.DATASETS)}")
    names, var_kw = _accepted(data.DATASETS[config.data.name])
    names.discard("split")
    for section in ("options", "train_options", "eval_options"):
        for key in getattr(config.data, section):
            if not var_kw and key not in names:
                raise ConfigError(f"data.{section}.{key}", f"unknown option of dataset {config.data.name!r}; expected one of {sorted(names)}")
            if key == "seed":
                raise ConfigError(f"data.{section}.seed", "the data seed is train.seed; not a dataset option")
            if key == "on_bad_file":
                raise ConfigError(f"data.{section}.on_bad_file", "set data.on_bad_file, not a dataset option")
            if key == "root" and section == "options":
                raise ConfigError("data.options.root", "set data.root (or a per-split root in data.train_options / data.eval_options)")
    if config.data.root is not None and "root" not in names and not var_kw:
        raise ConfigError("data.root", f"dataset {config.data.name!r} takes no root (it has options {sorted(names)})")
    if config.data.root is None and "root" in names:
        param = inspect.signature(data.DATASETS[config.data.name]).parameters["root"]
        if param.default is inspect.Parameter.empty:
            raise ConfigError("data.root", f"dataset {config.data.name!r} needs a root (a path)")
    if config.data.device_cache and task != "classification":
        raise ConfigError("data.device_cache", f"only for classification datasets (cifar10, image_folder); model {config.model.name!r} is {task}")
    for i, term in enumerate(config.losses):
        if term.name not in losses.LOSSES:
            raise ConfigError(f"losses[{i}].name", f"unknown loss {term.name!r}; expected one of {sorted(losses.LOSSES)}")
        lnames, lvar = _accepted(losses.LOSSES[term.name])
        for key in term.options:
            if key == "weight":
                raise ConfigError(f"losses[{i}].options.weight", f"set the weight as losses[{i}].weight, not as an option")
            if not lvar and key not in lnames:
                raise ConfigError(f"losses[{i}].options.{key}", f"unknown option of loss {term.name!r}; expected one of {sorted(lnames)}")
    for i, name in enumerate(config.eval.metrics):
        if name not in METRICS:
            raise ConfigError(f"eval.metrics[{i}]", f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
        if task not in METRICS[name][0]:
            usable = sorted(m for m, (tasks, _) in METRICS.items() if task in tasks)
            raise ConfigError(f"eval.metrics[{i}]", f"metric {name!r} does not apply to {task} model {config.model.name!r}; expected one of {usable}")
    if config.train.precision == "fp16" and _use_cpu(config):
        raise ConfigError("train.precision", "fp16 needs a GPU (loss scaling with GradScaler); on CPU use bf16 or fp32")
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but torch.cuda.is_available() is False; use auto or cpu")
    if config.convert is not None and config.train.steps is not None and config.convert.step > config.train.steps:
        raise ConfigError("convert.step", f"expected a step <= train.steps ({config.train.steps}), got {config.convert.step}")
    if config.convert is not None:
        from ..convert import LayerOptionError, check_layer_kwargs

        try:
            check_layer_kwargs(config.convert.to, config.convert.layer_kwargs())
        except LayerOptionError as error:
            key = {"breadth": "breadth", "num_experts": "breadth", "selector": "selector"}.get(error.key)
            raise ConfigError(f"convert.{key}" if key else f"convert.options.{error.key}", str(error)) from None
    if config.model.init is not None and training:
        try:
            ckpt.resolve_checkpoint(config.model.init)
        except ckpt.CheckpointError as error:
            raise ConfigError("model.init", str(error)) from None
    return task


def _check_model_values(config: Config) -> None:
    """Build the model on the meta device (no memory, no compute) so bad option values,
    nested ones included (``model.options.layer.breadth=0``), fail with the config check,
    naming the key path, instead of as a traceback when the trainer builds the model."""
    from ..models import build_model as build

    options = config.model.options
    try:
        with torch.device("meta"):
            build(config.model.name, **copy.deepcopy(options))
    except (ValueError, TypeError) as error:
        raise ConfigError(_option_path(options, str(error)), str(error)) from None
    except (RuntimeError, NotImplementedError):  # not buildable on the meta device: built later for real
        pass


def _option_path(options: dict[str, Any], message: str) -> str:
    """The key path of the model option an error message names (nested ones first)."""
    import re

    head = re.split(r"accepted|expected one of", message)[0]  # not the list of accepted names

    def named(key: str) -> bool:
        return re.search(rf"(?<![\w.]){re.escape(str(key))}(?![\w])", head) is not None

    for key, value in options.items():
        if isinstance(value, dict):
            for sub in value:
                if named(sub):
                    return f"model.options.{key}.{sub}"
    for key in options:
        if named(key):
            return f"model.options.{key}"
    nested = [k for k, v in options.items() if isinstance(v, dict)]
    return f"model.options.{nested[0]}" if len(nested) == 1 else "model.options"


def _use_cpu(config: Config) -> bool:
    return config.train.device == "cpu" or (config.train.device == "auto" and not torch.cuda.is_available())


# ------------------------------------------------------------------------------- models
def apply_conversion(model: nn.Module, record: dict[str, Any]) -> list[str]:
    """Apply one conversion record (``{"to", "include", "kwargs", ...}``) to ``model``."""
    from ..convert import convert

    include = record.get("converted") or record["include"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        names = convert(model, to=record["to"], include=list(include), **record.get("kwargs", {}))
    return list(names)


def conversion_record(cfg: ConvertConfig, step: int | None = None) -> dict[str, Any]:
    return {"to": cfg.to, "include": list(cfg.include), "kwargs": cfg.layer_kwargs(), "step": step}


def build_model(config: Config, conversions: list[dict[str, Any]] = ()) -> nn.Module:
    from ..models import build_model as build

    model = build(config.model.name, **copy.deepcopy(config.model.options))
    for record in conversions:
        apply_conversion(model, record)
    return model


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"{where} does not match the model: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} "
            "(is it from another model, or converted differently?)"
        )


def load_checkpoint_model(checkpoint: str | Path, config: Config | None = None, *, ema: bool = False) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model of a checkpoint (its conversions applied) and load its weights
    (the EMA weights with ``ema=True`` when present). Returns ``(model, config, meta)``."""
    path = ckpt.resolve_checkpoint(checkpoint)
    meta = ckpt.read_meta(path)
    if config is None:
        config = config_of_checkpoint(path)
    model = build_model(config, meta.get("conversions", []))
    weights_file = path / (ckpt.EMA_FILE if ema and (path / ckpt.EMA_FILE).is_file() else ckpt.MODEL_FILE)
    load_model_weights(model, ckpt.load_weights(weights_file), str(weights_file))
    return model, config, meta


def config_of_checkpoint(path: str | Path) -> Config:
    path = Path(path)
    for candidate in (path / "config.yaml", path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise FileNotFoundError(f"no config.yaml in {path} or its run directory; pass the config explicitly")


# ---------------------------------------------------------------------------- model cost
# Which pixels flops_per_pixel divides by (dynconv.models.flops: the image output, or the
# input for a classifier's 2-D output).
FLOPS_PER = {"classification": "input pixel", "super_resolution": "HR output pixel", "reconstruction": "reconstructed pixel"}
DEFAULT_LR_SIZE = 48  # SR input when the data config names no patch size (match_flops' lr_size)
DEFAULT_IMAGE_SIZE = 32  # CIFAR-10


def default_input_size(config: Config) -> tuple[int, int, str]:
    """``(H, W, where it comes from)`` of the model input that costs are quoted for: the
    training crop (SR: ``patch_size / scale``, the LR patch), else the data's ``size``, else
    48 (SR LR) or 32 (CIFAR). CondConv's per-example cost is spread over these pixels."""
    from ..data import DATASETS
    from ..models import model_task

    defaults: dict[str, Any] = {}
    if config.data.name in DATASETS:
        params = inspect.signature(DATASETS[config.data.name]).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def pick(key: str) -> tuple[Any, str]:
        for section in ("train_options", "options"):
            value = getattr(config.data, section).get(key)
            if value is not None:
                return value, f"data.{section}.{key}"
        if defaults.get(key) is not None:
            return defaults[key], f"{config.data.name}'s default {key}"
        return None, ""

    if model_task(config.model.name) == "super_resolution":
        patch, where = pick("patch_size")
        scale = pick("scale")[0] or config.model.options.get("scale") or 2
        if patch:
            side = int(patch) // int(scale)
            return side, side, f"LR patch: {where} {patch} / scale {scale}"
        return DEFAULT_LR_SIZE, DEFAULT_LR_SIZE, "default LR size (the data config names no patch_size)"
    size, where = pick("size")
    if size:
        return int(size), int(size), where
    return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, "CIFAR-10 default"


def model_cost(model: nn.Module, config: Config, input_size: tuple[int, int] | None = None, *,
               by_layer: bool = False) -> dict[str, Any]:
    """Params and FLOPs per pixel of ``model`` (:mod:`dynconv.models.flops`: switched and cond
    convs at their active cost) for an input of ``input_size`` (H, W; default
    :func:`default_input_size`), so runs, ``eval`` and ``info`` quote the same numbers."""
    from ..models import model_options, model_task
    from ..models.flops import model_summary

    if input_size is None:
        h, w, source = default_input_size(config)
    else:
        (h, w), source = input_size, "given"
    channels = {**model_options(config.model.name), **config.model.options}.get("in_channels", 3)
    channels = channels if isinstance(channels, int) and channels > 0 else 3
    summary = model_summary(model, (channels, int(h), int(w)))
    cost = {"params": summary["params"], "flops_per_pixel": summary["flops_per_pixel"],
            "flops_per": FLOPS_PER[model_task(config.model.name)], "input_size": [channels, int(h), int(w)],
            "input_size_from": source}
    if by_layer:
        cost["by_layer"] = summary["by_layer"]
    return cost


def format_cost(cost: dict[str, Any]) -> str:
    """One line: ``1,234 params, 5,678 FLOPs per HR output pixel (input 3x48x48)``."""
    return (f"{cost['params']:,} params, {cost['flops_per_pixel']:,.0f} FLOPs per {cost['flops_per']} "
            f"(input {'x'.join(map(str, cost['input_size']))})")


# ------------------------------------------------------------------------------ sampling
class EpochBatchSampler:
    """Batches of indices for one rank: a permutation seeded by ``(seed, epoch)``, split
    across ``world`` ranks, full batches only. ``set_epoch(epoch, start)`` starts at batch
    ``start`` of the epoch (resuming mid-epoch)."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.n // self.world) // self.batch_size

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        state = np.random.SeedSequence([int(self.seed), int(self.epoch), 0x5EED]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.n // self.world
        mine = self.order()[: per_rank * self.world][self.rank :: self.world]
        for b in range(self.start, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class _ShardedDeviceLoader:
    """A :class:`~dynconv.data.DeviceLoader` over global batches, each rank keeping its slice;
    ``set_epoch(epoch, start)`` skips ``start`` batches."""

    def __init__(self, loader, batch_size: int, rank: int, world: int) -> None:
        self.loader, self.batch_size, self.rank, self.world = loader, batch_size, rank, world
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.loader.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i < self.start:
                continue
            if self.world == 1:
                yield batch
            else:
                lo = self.rank * self.batch_size
                yield {k: v[lo : lo + self.batch_size] for k, v in batch.items()}


def to_channels_last(model: nn.Module) -> None:
    """Channels-last memory format for every 4-D parameter and buffer (``Module.to`` refuses
    models that also hold 5-D tensors, such as a switched conv's experts)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


# ---------------------------------------------------------------------------- accelerate
def _distributed_env() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if not _distributed_env():
        # A single process may train several models in turn (tests, `eval` after `train`):
        # start from a fresh Accelerate state each time.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.train.precision]
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.accumulate,
        cpu=_use_cpu(config),
        step_scheduler_with_optimizer=False,
    )


# ------------------------------------------------------------------------------- metrics
def _shave(outputs: dict, batch: dict) -> int:
    return max(int(batch["hr"].shape[-1] // batch["lr"].shape[-1]), 0)


def _target_and_pred(task: str, outputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if task == "super_resolution":
        return outputs["sr"], batch["hr"]
    return outputs["reconstruction"], batch["image"]


def per_sample_metric(name: str, task: str, outputs: dict, batch: dict) -> torch.Tensor:
    """Metric ``name`` per example ``(N,)`` (float64)."""
    from .. import metrics as M

    if name == "accuracy":
        return (outputs["logits"].argmax(1) == batch["label"]).double()
    if name == "top5":
        k = min(5, outputs["logits"].shape[1])
        return (outputs["logits"].topk(k, 1).indices == batch["label"][:, None]).any(1).double()
    if name in ("psnr_y", "ssim_y"):
        fn = M.psnr_y if name == "psnr_y" else M.ssim_y
        return fn(outputs["sr"].float().clamp(0, 1), batch["hr"].float(), shave=_shave(outputs, batch)).double()
    if name == "perplexity":
        value = outputs.get("perplexity")
        n = batch["image"].shape[0]
        return torch.full((n,), float("nan") if value is None else float(value), dtype=torch.float64)
    pred, target = _target_and_pred(task, outputs, batch)
    pred, target = pred.float(), target.float()
    if task == "super_resolution":
        pred = pred.clamp(0, 1)
    diff = (pred - target).flatten(1)
    if name == "mse":
        return diff.pow(2).mean(1).double()
    if name == "l1":
        return diff.abs().mean(1).double()
    if name == "psnr":
        data_range = 1.0 if task == "super_resolution" else float(target.max() - target.min()) or 1.0
        mse = diff.double().pow(2).mean(1).clamp_min(1e-20)
        return 10 * torch.log10(data_range**2 / mse)
    raise KeyError(name)


def _routing_tb_image(selection: torch.Tensor, breadth: int) -> torch.Tensor:
    """(H, W) expert indices -> (3, H, W) colours."""
    tab10 = torch.tensor([
        [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
    ], dtype=torch.float32) / 255.0
    if breadth > 10:
        import colorsys

        tab10 = torch.tensor([colorsys.hsv_to_rgb(i / breadth, 0.75, 0.9) for i in range(breadth)], dtype=torch.float32)
    return tab10[selection.long().cpu()].permute(2, 0, 1)


def _display(image: torch.Tensor) -> torch.Tensor:
    img = image.detach().float().cpu()
    img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo).clamp_min(1e-8)


# ------------------------------------------------------------------------------- trainer
class Trainer:
    """Train ``config`` into ``run_dir`` (``resume=True``: continue from its latest checkpoint).

    ``mode='eval'`` builds only what evaluation needs (no optimizer, no training data).
    """

    def __init__(self, config: Config, run_dir: str | Path, *, resume: bool = False, mode: str = "train",
                 checkpoint: str | Path | None = None) -> None:
        # A training run holds RUN_DIR's lock (main process) from before it reads or writes
        # anything there until fit() ends (or close(), or garbage collection): a second run
        # into the same directory fails at once with RunDirLockedError.
        self._lock: RunDirLock | None = None
        try:
            self._setup(config, run_dir, resume=resume, mode=mode, checkpoint=checkpoint)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (fit() does at its end; idempotent)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the OS releases the lock anyway
            pass

    def _acquire_lock(self) -> None:
        if self.mode == "train" and self.is_main and self._lock is None:
            self._lock = RunDirLock(self.run_dir).acquire()

    def _setup(self, config: Config, run_dir: str | Path, *, resume: bool, mode: str,
               checkpoint: str | Path | None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.task = check_config(config, training=mode == "train")
        self.accelerator = make_accelerator(config)
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self._acquire_lock()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}
        self._interrupt = False
        self._stop_signal: str | None = None
        self._step_rng: dict[str, Any] | None = None
        self._step_buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._mid_step = False  # between the step's snapshot and its end: see _snapshot_step_start
        self._in_update = False
        self._last_saved_step: int | None = None
        self.logger = RunLogger(self.run_dir, enabled=False, tensorboard=False, progress=False, total_steps=0)
        self.conversion_checks: list[dict[str, float]] = []

        from accelerate.utils import set_seed

        set_seed(config.train.seed)
        resume_from = None
        self.skipped_checkpoints: list[tuple[Path, str]] = []  # damaged newer checkpoints resume passed over
        if resume:
            resume_from, self.skipped_checkpoints = ckpt.newest_intact_checkpoint(self.ckpt_dir)
            if resume_from is None:
                why = "".join(f"; skipped {p.name}: {reason}" for p, reason in self.skipped_checkpoints)
                raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {self.ckpt_dir}{why}")
            if self.is_main:
                for path, reason in self.skipped_checkpoints:
                    print(f"dynconv: resume skips the damaged checkpoint {path.name}: {reason}; resuming from "
                          f"{resume_from.name}", file=sys.stderr, flush=True)
        # -- model (conversion records first, so the architecture matches the weights)
        init_weights = None
        if resume_from is not None:
            self.conversions = list(ckpt.read_meta(resume_from).get("conversions", []))
        elif checkpoint is not None:
            self.conversions = list(ckpt.read_meta(ckpt.resolve_checkpoint(checkpoint)).get("conversions", []))
        elif config.model.init is not None:
            init = ckpt.resolve_checkpoint(config.model.init)
            self.conversions = list(ckpt.read_meta(init).get("conversions", []))
            init_weights = (init, ckpt.load_weights(init / ckpt.MODEL_FILE))
        else:
            self.conversions = []
        self.raw = build_model(config, self.conversions)
        if init_weights is not None:
            load_model_weights(self.raw, init_weights[1], str(init_weights[0]))
        self.raw.to(self.device)
        if config.train.channels_last:
            to_channels_last(self.raw)
        self._build_losses()
        self.metric_names = list(config.eval.metrics) or list(DEFAULT_METRICS[self.task])
        self.best_metric = config.eval.best_metric or self.metric_names[0]
        self.best_mode = config.eval.best_mode if config.eval.best_metric else METRICS[self.best_metric][1]
        self.eval_dataset = self._dataset(config.data.eval_split, config.data.eval_options)
        self._check_items("eval", self.eval_dataset)
        if mode == "eval":
            self.ema = None
            return
        # -- data
        self.train_dataset = self._dataset(config.data.train_split, config.data.train_options)
        self._check_items("train", self.train_dataset)
        self.train_loader = self._train_loader()
        self.batches_per_epoch = len(self.train_loader)
        if self.batches_per_epoch == 0:
            raise ConfigError("train.batch_size", f"the training set ({len(self.train_dataset)} items over {self.world} process(es)) "
                              f"holds no full batch of {config.train.batch_size}")
        steps_per_epoch = max(self.batches_per_epoch // config.train.accumulate, 1)
        self.total_steps = config.train.steps if config.train.steps is not None else config.train.epochs * steps_per_epoch
        # -- optimizer, EMA
        self.optimizer = self._make_optimizer(self.raw)
        self.ema = EMA(self.raw, config.train.ema) if config.train.ema is not None else None
        if resume_from is not None:
            self._load_resume_state(resume_from)
        self._prepare()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
            ckpt.remove_stale_temporaries(self.ckpt_dir)
        self.resumed_from = resume_from

    # -- building ---------------------------------------------------------------------------
    def _check_items(self, split: str, ds) -> None:
        """Every image of an SR split must fit before the first step (a file that does not
        would otherwise crash the run at its first evaluation, or mid-epoch): at least
        ``scale`` (and the training ``patch_size``) pixels per side, and for ``psnr_y`` /
        ``ssim_y``, which shave ``scale`` pixels at each border, more than ``2 * scale``.
        Sizes come from the cache or the file headers. Raises DatasetError naming the file."""
        if self.task != "super_resolution" or not hasattr(ds, "hr_sizes"):
            return
        from ..data import DatasetError

        scale, patch = int(ds.scale), ds.patch_size
        shaved = [m for m in self.metric_names if m in ("psnr_y", "ssim_y")] if split == "eval" else []
        for source, (h, w) in ds.hr_sizes():
            side = min(h, w) if patch is None else min(h, w, patch)
            size = f"{h}x{w}" + (f" (cropped to a multiple of scale {scale})" if scale > 1 else "")
            if min(h, w) < max(scale, patch or 0):
                need = f"patch_size={patch}" if patch else f"scale={scale}"
                raise DatasetError(f"{split} image {source} is {size}, smaller than {need}; remove it "
                                   "or set data.on_bad_file=skip")
            if shaved and side <= 2 * scale:
                raise DatasetError(f"eval image {source} is {size}: {'/'.join(shaved)} shave {scale} pixels at each "
                                   f"border and need more than {2 * scale} pixels per side; remove it from the eval set")

    def _dataset(self, split: str, split_options: dict):
        from ..data import DATASETS, build_dataset

        cfg = self.config.data
        names, var_kw = _accepted(DATASETS[cfg.name])
        options = dict(cfg.options)
        if cfg.root is not None:
            options["root"] = cfg.root
        options.update(split_options)  # a split may have its own root
        if "seed" in names or var_kw:
            options["seed"] = self.config.train.seed
        if "on_bad_file" in names or var_kw:
            options["on_bad_file"] = cfg.on_bad_file
        return build_dataset(cfg.name, split, **options)

    def _train_loader(self):
        cfg = self.config
        if cfg.data.device_cache:
            from ..data import DeviceLoader

            ds = self.train_dataset
            loader = DeviceLoader(
                ds, cfg.train.batch_size * self.world, self.device, shuffle=True, seed=cfg.train.seed,
                augment="crop_flip" if getattr(ds, "augment", True) else None, pad=int(getattr(ds, "pad", 4)), drop_last=True,
            )
            return _ShardedDeviceLoader(loader, cfg.train.batch_size, self.rank, self.world)
        sampler = EpochBatchSampler(len(self.train_dataset), cfg.train.batch_size, seed=cfg.train.seed,
                                    rank=self.rank, world=self.world)
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator(),  # loaders draw their base seed from it, not the global RNG
        )
        return _SamplerLoader(loader, sampler, self.train_dataset)

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.config.optim
        params = [p for p in model.parameters() if p.requires_grad]
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def _build_losses(self) -> None:
        from ..losses import build_loss

        self.loss_terms = []
        for term in self.config.losses:
            fn = build_loss(term.name, **term.options)
            if isinstance(fn, nn.Module):
                fn.to(self.device)
            self.loss_terms.append((term.name, term.weight, fn, bool(getattr(fn, "needs_model", False))))

    def _prepare(self) -> None:
        cfg = self.config
        if cfg.train.checkpointing:
            if enable_block_checkpointing(self.raw) == 0:
                warnings.warn(f"train.checkpointing: model {cfg.model.name!r} defines no checkpoint_blocks(); nothing is checkpointed")
        module = torch.compile(self.raw) if cfg.train.compile else self.raw
        self.model, self.optimizer = self.accelerator.prepare(module, self.optimizer)

    # -- forward / loss ----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> dict:
        out = model(batch[TASK_INPUT[self.task]])
        if isinstance(out, torch.Tensor):
            out = {"logits": out} if self.task == "classification" else {"sr": out} if self.task == "super_resolution" else {"reconstruction": out}
        return out

    def loss(self, outputs: dict, batch: dict, model: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the loss terms and each (unweighted) term. Terms with
        ``needs_model`` (translational consistency) are called as ``fn(model, batch, step)``."""
        total, terms = 0.0, {}
        for name, weight, fn, needs_model in self.loss_terms:
            if needs_model:
                value = fn(model if model is not None else self.model, batch, self.step)
            else:
                value = fn(outputs, batch)
            key = name if name not in terms else f"{name}_{len(terms)}"
            terms[key] = value.detach()
            total = total + weight * value.float()
        return total, terms

    # -- data stream -------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[dict]:
        while True:
            self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.train_loader:
                self.batch_in_epoch += 1
                yield _to_device(batch, self.device, self.config.train.channels_last)
            self.epoch += 1
            self.batch_in_epoch = 0

    # -- state -------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _state(self, position: tuple[int, int], gather_rng: bool, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        rng = ckpt.rng_state() if rng is None else rng
        if gather_rng and self.world > 1:
            rngs: list = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "epoch": position[0],
            "batch_in_epoch": position[1],
            "optimizer": self._optimizer().state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "world_size": self.world,
            "best": json.dumps(self.best) if self.best else None,
            "buffers": ckpt.nonpersistent_buffers(self.raw),
        }

    def save(self, position: tuple[int, int] | None = None, *, gather_rng: bool = True, reason: str = "periodic",
             rng: dict[str, Any] | None = None) -> Path | None:
        """Write a checkpoint of the current step (main process; RNG states of every rank).
        ``rng``: this rank's RNG state to record (default: now), e.g. from the step's start."""
        position = position or (self.epoch, self.batch_in_epoch)
        state = self._state(position, gather_rng, rng)
        path = None
        if self.is_main:
            meta = {"conversions": self.conversions, "metrics": self.last_metrics, "reason": reason,
                    "model": self.config.model.name, "task": self.task, "epoch": position[0],
                    "total_steps": self.total_steps,
                    # what `dynconv viz` reports: the usage counters are not part of the weights
                    "routing": {"step": self.step, "layers": self._routing_stats()}}
            import yaml

            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.step, model_state=self.raw.state_dict(), state=state, meta=meta,
                ema_state=self.ema.state_dict() if self.ema is not None else None,
                text_files={ckpt.CONFIG_FILE: yaml.safe_dump(self.config.to_dict(), sort_keys=False)},
            )
            ckpt.prune_checkpoints(self.ckpt_dir, self.config.log.keep_last)
            self.logger.event("checkpoint", self.step, path=str(path), reason=reason)
        self._last_saved_step = self.step
        if gather_rng and self.world > 1:
            self.accelerator.wait_for_everyone()
        return path if path is not None else self.ckpt_dir / ckpt.checkpoint_name(self.step)

    def _load_resume_state(self, path: Path) -> None:
        load_model_weights(self.raw, ckpt.load_weights(path / ckpt.MODEL_FILE, self.device), str(path))
        state = ckpt.load_state(path)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self._optimizer().load_state_dict(state["optimizer"])
        self._resume_scaler = state.get("scaler")
        if self.ema is not None and (path / ckpt.EMA_FILE).is_file():
            self.ema.load_state_dict(ckpt.load_weights(path / ckpt.EMA_FILE, self.device))
        rngs = state["rng"]
        if len(rngs) != self.world:
            warnings.warn(f"resuming on {self.world} process(es) from a checkpoint written by {len(rngs)}: "
                          "RNG streams (dropout, selector dropout) differ from an uninterrupted run")
        ckpt.set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        ckpt.load_nonpersistent_buffers(self.raw, state.get("buffers", {}))
        self.best = json.loads(state["best"]) if state.get("best") else None
        self._last_saved_step = self.step

    # -- staged conversion ----------------------------------------------------------------------
    def convert_now(self, batch: dict | None = None) -> dict[str, float]:
        """Convert the model per ``config.convert`` at the current step: rebuild the optimizer
        (old parameters keep their state; new ones start fresh), the EMA and the DDP wrapper.
        With ``batch``, the loss on it is computed in eval mode before and after (logged)."""
        cfg = self.config.convert
        acc = self.accelerator
        check: dict[str, float] = {}
        if batch is not None:
            check["loss_before"] = self._eval_loss(batch)
        old_opt = self._optimizer()
        self.raw = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        if hasattr(self.raw, "_orig_mod"):  # torch.compile
            self.raw = self.raw._orig_mod
        acc.free_memory()
        old_params = dict(self.raw.named_parameters())
        record = conversion_record(cfg, self.step)
        record["converted"] = apply_conversion(self.raw, {**record, "converted": None})
        if not record["converted"]:
            warnings.warn(f"convert: no nn.Conv2d matched {cfg.include}; the model is unchanged")
        self.conversions.append(record)
        self.raw.to(self.device)
        if self.config.train.channels_last:
            to_channels_last(self.raw)
        new_opt = self._make_optimizer(self.raw)
        for group, old_group in zip(new_opt.param_groups, old_opt.param_groups):
            for key in ("initial_lr", "lr"):
                if key in old_group:
                    group[key] = old_group[key]
        # surviving parameters keep their state; a converted layer's parameter keeps the
        # state of the one it replaces when name and shape agree (a switched conv's bias)
        for name, p in self.raw.named_parameters():
            old = old_params.get(name)
            if old is None or old not in old_opt.state:
                continue
            if old is p:
                new_opt.state[p] = old_opt.state[old]
            elif old.shape == p.shape:
                new_opt.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in old_opt.state[old].items()}
        self.optimizer = new_opt
        if self.ema is not None:
            self.ema = EMA(self.raw, self.config.train.ema)
        self._prepare()
        if batch is not None:
            check["loss_after"] = self._eval_loss(batch)
            check["difference"] = abs(check["loss_after"] - check["loss_before"])
        self.conversion_checks.append(check)
        self.logger.write(f"step {self.step}: converted {len(record['converted'])} conv(s) to {cfg.to}"
                          + (f" (loss on the next batch {check['loss_before']:.6g} -> {check['loss_after']:.6g})" if check else ""))
        cost = self._log_model_cost(f"step {self.step}: converted model")
        self.logger.event("conversion", self.step, converted=record["converted"], to=cfg.to, **check, **cost)
        return check

    def _log_model_cost(self, label: str) -> dict[str, Any]:
        """Params and FLOPs/pixel of the current model (at start and after a conversion, which
        changes both) to the console and TensorBoard; returned for the JSONL event (main only)."""
        if not self.is_main:
            return {}
        cost = model_cost(self.raw, self.config)
        line = f"{label}: {format_cost(cost)}"
        self.logger.scalars(self.step, {"model/params": cost["params"], "model/flops_per_pixel": cost["flops_per_pixel"]})
        self.logger.text("model/cost", line, self.step)
        self.logger.write(line)
        return cost

    @torch.no_grad()
    def _eval_loss(self, batch: dict) -> float:
        was = self.raw.training
        self.raw.eval()
        try:
            outputs = self.forward(self.raw, batch)
            loss, _ = self.loss(outputs, batch, model=self.raw)
        finally:
            self.raw.train(was)
        return float(loss)

    # -- SIGINT / SIGTERM ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _sigint(self):
        """Ctrl-C and SIGTERM (what schedulers and ``timeout`` send before killing) both
        finish the current step, save and stop; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signals}

        def handler(signum, frame):
            if self._interrupt:  # a second signal: stop now
                raise KeyboardInterrupt
            self._interrupt = True
            self._stop_signal = signal.Signals(signum).name
            self.logger.write(f"{self._stop_signal}: finishing this step, then saving a checkpoint "
                              "(send it again to stop at once)")

        for s in signals:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s in signals:
                signal.signal(s, previous[s])

    # -- training loop -------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> FitResult:
        """Train to ``total_steps`` (or stop after step ``max_steps``, saving a checkpoint).

        Raises :class:`TrainingError` on a NaN/inf loss after saving a checkpoint of the
        last good step. Ctrl-C or SIGTERM saves a checkpoint at the end of the current step
        and returns with ``interrupted=True`` (``signal`` names it). Any other exception
        saves the last completed step (unless it came during the weight update), then
        propagates. The run directory's lock is released when fit returns or raises.
        """
        self._acquire_lock()
        try:
            return self._fit(max_steps)
        finally:
            self.close()

    def _fit(self, max_steps: int | None) -> FitResult:
        cfg = self.config
        acc = self.accelerator
        stop_at = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                                progress=cfg.log.progress, total_steps=self.total_steps, initial_step=self.step)
        log = self.logger
        cost = self._log_model_cost("model")
        skipped = {split: n for split, ds in (("train", self.train_dataset), ("eval", self.eval_dataset))
                   if (n := int(getattr(ds, "skipped", 0) or 0))}
        extra = {"skipped_files": skipped} if skipped else {}
        if self.is_main:
            record_run_start(self.run_dir, "resume" if self.resumed_from is not None else "start", self.step)
        if self.resumed_from is None:
            log.event("start", self.step, total_steps=self.total_steps, world_size=self.world, device=str(self.device),
                      precision=cfg.train.precision, config=cfg.to_dict(), **extra, **cost)
        else:
            for path, reason in getattr(self, "skipped_checkpoints", []):
                log.event("skipped_checkpoint", self.step, checkpoint=str(path), reason=reason)
            # records that a killed run wrote after this checkpoint are superseded: read_log
            # drops the earlier records with step > discarded_after
            superseded = count_records_after(self.run_dir / "log.jsonl", self.step) if self.is_main else 0
            log.event("resume", self.step, checkpoint=str(self.resumed_from), world_size=self.world,
                      discarded_after=self.step, superseded=superseded, **extra, **cost)
        if getattr(self, "_resume_scaler", None) and acc.scaler is not None:
            acc.scaler.load_state_dict(self._resume_scaler)
        global_batch = cfg.train.batch_size * cfg.train.accumulate * self.world
        stream = self._micro_batches()
        # a resumed run that has nothing left to do reports the checkpoint it resumed from
        result = FitResult(step=self.step, total_steps=self.total_steps, checkpoint=self.resumed_from)
        window_loss, window_terms, window_steps, window_start = 0.0, {}, 0, time.perf_counter()
        position = (self.epoch, self.batch_in_epoch)
        self._mid_step = False
        try:
            with self._sigint():
                while self.step < stop_at:
                    position = (self.epoch, self.batch_in_epoch)
                    batch = next(stream)
                    if cfg.convert is not None and self.step >= cfg.convert.step and not self._converted_at_config():
                        self._in_update = True  # a half-converted model is not a state to save
                        self.convert_now(batch)
                        self._in_update = False
                    self._snapshot_step_start()
                    lr = set_lr(self._optimizer(), cfg.schedule, self.step, self.total_steps)
                    self.model.train()
                    loss_sum = torch.zeros((), device=self.device)
                    term_sums: dict[str, torch.Tensor] = {}
                    for micro in range(cfg.train.accumulate):
                        if micro:
                            batch = next(stream)
                        with acc.accumulate(self.model):
                            outputs = self.forward(self.model, batch)
                            loss, terms = self.loss(outputs, batch)
                            acc.backward(loss)
                        loss_sum += loss.detach().float()
                        for k, v in terms.items():
                            term_sums[k] = term_sums.get(k, 0.0) + v.float()
                    # one collective per step: the mean loss and the interrupt flag of every rank
                    flags = torch.stack([loss_sum / cfg.train.accumulate,
                                         torch.tensor(float(self._interrupt), device=self.device)])
                    flags = acc.reduce(flags, "sum") if self.world > 1 else flags
                    mean_loss = float(flags[0]) / self.world
                    if not math.isfinite(mean_loss):
                        self._optimizer().zero_grad(set_to_none=True)
                        path = self.save(position, reason="nonfinite")
                        log.event("nonfinite", self.step + 1, loss=mean_loss, checkpoint=str(path))
                        raise TrainingError(
                            f"non-finite loss ({mean_loss}) at step {self.step + 1}; stopped. The last good state "
                            f"(step {self.step}) is saved in {path}. Lower optim.lr, enable optim.grad_clip or use "
                            "train.precision fp32, then resume with --resume."
                        )
                    if cfg.optim.grad_clip is not None:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                    self._in_update = True
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    if self.ema is not None:
                        self.ema.update(self.raw)
                    position = (self.epoch, self.batch_in_epoch)
                    self._in_update = self._mid_step = False
                    window_loss += mean_loss
                    window_steps += 1
                    for k, v in term_sums.items():
                        window_terms[k] = window_terms.get(k, 0.0) + float(v) / cfg.train.accumulate
                    log.progress(1, loss=mean_loss, lr=lr)
                    interrupted = float(flags[1]) > 0 or (self.world == 1 and self._interrupt)
                    # -- logging
                    if self.step % cfg.log.every == 0 or self.step == stop_at:
                        elapsed = time.perf_counter() - window_start
                        record = {"loss": window_loss / window_steps, "lr": lr,
                                  "samples_per_s": window_steps * global_batch / max(elapsed, 1e-9), "epoch": self.epoch,
                                  **{f"loss/{k}": v / window_steps for k, v in window_terms.items()}}
                        log.event("train", self.step, **record)
                        log.scalars(self.step, {"train/loss": record["loss"], "train/lr": lr,
                                                "train/samples_per_s": record["samples_per_s"],
                                                **{f"train/{k}": v for k, v in record.items() if k.startswith("loss/")}})
                        log.routing(self.step, self._routing_stats())
                        window_loss, window_terms, window_steps, window_start = 0.0, {}, 0, time.perf_counter()
                    if cfg.log.images_every and self.step % cfg.log.images_every == 0:
                        self._log_images()
                    # -- evaluation (best checkpoint), checkpoints
                    improved = False
                    if self.step % cfg.eval.every == 0 or self.step == self.total_steps:
                        improved = self._evaluate_and_track()
                    if (self.step % cfg.log.checkpoint_every == 0 or improved or self.step == stop_at or interrupted):
                        path = self.save(reason="interrupt" if interrupted else "periodic")
                        result.checkpoint = path
                        if improved and self.is_main:
                            ckpt.write_best(self.ckpt_dir, path, self.best_metric, self.best["value"], self.step)
                            ckpt.prune_checkpoints(self.ckpt_dir, cfg.log.keep_last)
                    if interrupted:
                        result.interrupted = True
                        result.signal = self._stop_signal
                        log.event("interrupt", self.step, checkpoint=str(result.checkpoint), signal=self._stop_signal)
                        log.write(f"interrupted: saved {result.checkpoint} at step {self.step}; resume with --resume {self.run_dir}")
                        break
        except KeyboardInterrupt:
            # a second Ctrl-C (or one outside the main thread): save the state of the last
            # completed step (with the data position of that step), unless the weights were
            # being updated when it came
            self._optimizer().zero_grad(set_to_none=True)
            result.interrupted = True
            result.signal = self._stop_signal
            if self._in_update:
                log.write(f"interrupted during the weight update of step {self.step + 1}: no checkpoint written; "
                          f"resume from the last one in {self.ckpt_dir}")
            else:
                rng = self._restore_step_start()
                result.checkpoint = self.save(position, gather_rng=False, reason="interrupt", rng=rng)
                log.event("interrupt", self.step, checkpoint=str(result.checkpoint), signal=self._stop_signal)
                log.write(f"interrupted: saved {result.checkpoint} at step {self.step}; resume with --resume {self.run_dir}")
        except TrainingError:
            raise
        except Exception as error:
            self._save_after_error(error, position)
            raise
        finally:
            log.close()
        result.step = self.step
        result.metrics = dict(self.last_metrics)
        result.best = self.best
        if self.is_main and self.last_metrics and self.step == self.total_steps:
            ckpt.atomic_write_text(self.run_dir / "metrics.json", json.dumps(
                {"step": self.step, "metrics": self.last_metrics, "best": self.best}, indent=2))
        return result

    def _snapshot_step_start(self) -> None:
        """Keep what a checkpoint of this point needs should the step not finish (an error, a
        second Ctrl-C): the RNG states and the model's buffers, which forward passes update
        (BatchNorm / SwitchNorm statistics). One fused copy into buffers kept across steps."""
        self._step_rng = ckpt.rng_state()
        buffers = [b.detach() for b in self.raw.buffers()]
        kept = self._step_buffers
        if (kept is None or len(kept[0]) != len(buffers)
                or any(a is not b or a.shape != c.shape for a, b, c in zip(kept[0], buffers, kept[1]))):
            self._step_buffers = (buffers, [b.clone() for b in buffers])
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(kept[1], buffers)
        self._mid_step = True

    def _restore_step_start(self) -> dict[str, Any] | None:
        """Undo a partial step's buffer updates; returns the RNG state of the step's start to
        save (None outside a step: the current state is a step boundary already)."""
        if not self._mid_step or self._step_buffers is None:
            return None
        with torch.no_grad():
            for buffer, kept in zip(*self._step_buffers):
                buffer.copy_(kept)
        self._mid_step = False
        return self._step_rng

    def _save_after_error(self, error: BaseException, position: tuple[int, int]) -> None:
        """An exception in the training loop: save the last completed step (with its data
        position and the RNG state of the step's start, as a second Ctrl-C does) so the work
        is not lost; the caller re-raises. Nothing is saved during the weight update."""
        log = self.logger
        what = (f"{type(error).__name__}: {error}".splitlines() or [type(error).__name__])[0]
        if self._in_update:
            log.write(f"error during the weight update of step {self.step + 1} ({what}): no checkpoint written; "
                      f"resume from the last one in {self.ckpt_dir}")
            return
        if self.step == 0:
            log.write(f"error in step 1 ({what}): no step was completed, nothing to save")
            return
        if self._last_saved_step == self.step:
            path = self.ckpt_dir / ckpt.checkpoint_name(self.step)
        else:
            try:
                self._optimizer().zero_grad(set_to_none=True)
                path = self.save(position, gather_rng=False, reason="error", rng=self._restore_step_start())
            except Exception as save_error:  # e.g. the disk is full: report the first error
                log.write(f"error at step {self.step + 1} ({what}); writing a checkpoint failed too: {save_error}")
                return
        log.event("error", self.step, error=what, checkpoint=str(path))
        log.write(f"error at step {self.step + 1} ({what}): the last completed step ({self.step}) is saved in {path}; "
                  f"fix the cause, then continue with --resume {self.run_dir}")

    def _converted_at_config(self) -> bool:
        return any(r.get("step") is not None for r in self.conversions)

    def _routing_stats(self) -> dict:
        from ..insight import routing_stats

        return routing_stats(self.raw)

    # -- evaluation ------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if getattr(self, "ema", None) is not None else self.raw

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Metrics over the eval split (sharded across ranks, reduced), means per example."""
        cfg = self.config
        model = self.eval_model()
        was = model.training
        model.eval()
        max_batches = cfg.eval.max_batches if max_batches is None else max_batches
        ds = self.eval_dataset
        indices = list(range(len(ds)))[self.rank :: self.world]
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.eval.batch_size, sampler=indices,
                                             num_workers=cfg.data.num_workers, generator=torch.Generator())
        names = self.metric_names
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        try:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                batch = _to_device(batch, self.device, cfg.train.channels_last)
                with self.accelerator.autocast():
                    outputs = self.forward(model, batch)
                n = batch[TASK_INPUT[self.task]].shape[0]
                for j, name in enumerate(names):
                    if name == "loss":
                        loss, _ = self.loss(outputs, batch, model=model)
                        sums[j] += float(loss) * n
                    else:
                        sums[j] += per_sample_metric(name, self.task, outputs, batch).sum().cpu()
                sums[-1] += n
        finally:
            model.train(was)
        if self.world > 1:
            sums = self.accelerator.reduce(sums.to(self.device), "sum").cpu()
        count = max(float(sums[-1]), 1.0)
        return {name: float(sums[j]) / count for j, name in enumerate(names)}

    def _evaluate_and_track(self) -> bool:
        metrics = self.evaluate()
        self.last_metrics = metrics
        self.logger.event("eval", self.step, **metrics)
        self.logger.scalars(self.step, metrics, prefix="eval/")
        self.logger.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        value = metrics.get(self.best_metric)
        if value is None or not math.isfinite(value):
            return False
        better = self.best is None or (value > self.best["value"] if self.best_mode == "max" else value < self.best["value"])
        if better:
            self.best = {"metric": self.best_metric, "value": value, "step": self.step}
        return better

    @torch.no_grad()
    def _log_images(self) -> None:
        if not self.is_main or self.logger.writer is None or len(self.eval_dataset) == 0:
            return
        from ..insight import selector_maps

        item = self.eval_dataset[0]
        batch = _to_device({k: v[None] if isinstance(v, torch.Tensor) else v for k, v in item.items()}, self.device)
        x = batch[TASK_INPUT[self.task]]
        model = self.raw
        if self.task != "classification":
            was = model.training
            model.eval()
            try:
                outputs = self.forward(model, batch)
            finally:
                model.train(was)
            pred, target = _target_and_pred(self.task, outputs, batch)
            if self.task == "super_resolution":
                self.logger.image("samples/output", pred[0].clamp(0, 1), self.step)
                self.logger.image("samples/target", target[0], self.step)
            else:
                self.logger.image("samples/reconstruction", _display(pred[0]), self.step)
                self.logger.image("samples/input", _display(target[0]), self.step)
        maps = selector_maps(model, x)
        for name, selection in maps.items():
            breadth = model.get_submodule(name).breadth
            self.logger.image(f"selector/{name or 'layer'}", _routing_tb_image(selection[0], breadth), self.step)


class _SamplerLoader:
    """A DataLoader over an :class:`EpochBatchSampler`; ``set_epoch`` sets both the sampler
    and the dataset (per-sample augmentation is seeded by ``(seed, epoch, index)``)."""

    def __init__(self, loader, sampler: EpochBatchSampler, dataset) -> None:
        self.loader, self.sampler, self.dataset = loader, sampler, dataset

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)


# ------------------------------------------------------------------------------ evaluate
def evaluate(config_or_run_dir: str | Path | Config, checkpoint: str | Path | None = None, *,
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
    metrics = trainer.evaluate(max_batches=max_batches)
    result = {"metrics": metrics, "checkpoint": str(path), "step": meta.get("step"), "weights": weights.name,
              "model": config.model.name, "dataset": config.data.name, "split": config.data.eval_split,
              **model_cost(trainer.raw, config)}
    if write and trainer.is_main:
        out_dir = run_dir if run_dir is not None else path.parent
        ckpt.atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(result, indent=2))
        result["written"] = str(Path(out_dir) / "metrics.json")
    return result


def evaluate_eval_set(run_dir: str | Path, name: str, folder: str | Path, checkpoint: str | Path | None = None, *,
                      overrides: list[str] | None = None, max_batches: int | None = None,
                      write: bool = True) -> dict[str, Any]:
    """Score a run on any folder of images as eval set ``name`` (SR: a folder of HR images of
    any size, grayscale or RGBA files converted to RGB), without editing its config: the
    run's config with the eval split pointed at ``folder``. Writes ``RUN/eval/<name>.json``,
    one file per set, so evaluating one set never overwrites another's results."""
    run_dir, folder = Path(run_dir), Path(folder).expanduser().resolve()
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"eval set name must be a plain file name such as Set5, got {name!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"eval set {name!r}: folder not found: {folder}")
    # the folder's parent as the split's root and its name as the split: sr_folder reads
    # root/split, image_folder root/split/<class>
    overrides = [*(overrides or []), f"data.eval_options.root={json.dumps(str(folder.parent))}",
                 f"data.eval_split={json.dumps(folder.name)}"]
    if load_config(run_dir).data.name == "skimage_sr":  # trained on the bundled photos: read the folder the same way
        overrides.append("data.name=sr_folder")
    result = evaluate(run_dir, checkpoint, overrides=overrides, max_batches=max_batches, write=False)
    result.update({"eval_set": name, "folder": str(folder), "split": str(folder)})
    if write:
        out = run_dir / "eval" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out, json.dumps(result, indent=2))
        result["written"] = str(out)
    return result
