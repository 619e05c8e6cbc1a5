"""An experiment from its config: the config check, the model (its conversions applied, or
rebuilt from a checkpoint), the datasets, loss terms, optimizer and Accelerator, and the
model's cost (params, FLOPs per pixel). What the trainer, ``evaluate`` and the CLI build from.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import Config, ConfigError, ConvertConfig, load_config
from . import checkpoint as ckpt
from ..registry import Registry
from .tasks import EVAL_METRICS, METRICS, TASKS, metrics_for


# --------------------------------------------------------------------------- config check
_DATA_SECTIONS = ("options", "train_options", "eval_options")
# options a config sets elsewhere, never among a builder's: (registry kind, section, key) -> where
_SET_ELSEWHERE = {
    **{("dataset", section, "seed"): "the data seed is train.seed; not a dataset option" for section in _DATA_SECTIONS},
    **{("dataset", section, "on_bad_file"): "set data.on_bad_file, not a dataset option" for section in _DATA_SECTIONS},
    ("dataset", "options", "root"): "set data.root (or a per-split root in data.train_options / data.eval_options)",
    ("loss", "options", "weight"): "set the weight as {path}.weight, not as an option",
}


def _named_entries(config: Config) -> list[tuple[str, str | None, Registry, str, dict[str, dict]]]:
    """Every registry entry ``config`` names: ``(key path of the name, key path of its
    options, registry, name, {option section: options})``."""
    from ..data import DATASETS
    from ..losses import LOSSES
    from ..models import MODELS

    return [
        ("model.name", "model", MODELS, config.model.name, {"options": config.model.options}),
        ("data.name", "data", DATASETS, config.data.name, {s: getattr(config.data, s) for s in _DATA_SECTIONS}),
        *((f"losses[{i}].name", f"losses[{i}]", LOSSES, term.name, {"options": term.options})
          for i, term in enumerate(config.losses)),
        *((f"eval.metrics[{i}]", None, EVAL_METRICS, name, {}) for i, name in enumerate(config.eval.metrics)),
    ]


def check_config(config: Config, *, training: bool = True) -> str:
    """Check every name and option of ``config`` against the registries, before anything is
    built; raise :class:`ConfigError` naming the key path. Returns the model's task."""
    from ..data import DATASETS
    from ..models import model_task

    for name_path, path, registry, name, sections in _named_entries(config):
        if name not in registry:
            raise ConfigError(name_path, f"unknown {registry.kind} {name!r}; expected one of {sorted(registry)}")
        accepted = registry.options(name)
        for section, options in sections.items():
            for key in options:
                elsewhere = _SET_ELSEWHERE.get((registry.kind, section, key))
                if elsewhere is not None:
                    raise ConfigError(f"{path}.{section}.{key}", elsewhere.format(path=path))
                if not accepted.accepts(key):
                    raise ConfigError(f"{path}.{section}.{key}", f"unknown option of {registry.kind} {name!r}; "
                                      f"expected one of {sorted(accepted.names)}")
    meta_model = _check_model_values(config)
    task = model_task(config.model.name)
    data_options = DATASETS.options(config.data.name)
    if config.data.root is not None and not data_options.accepts("root"):
        raise ConfigError("data.root", f"dataset {config.data.name!r} takes no root (it has options {sorted(data_options.names)})")
    if config.data.root is None and "root" in data_options.required:
        raise ConfigError("data.root", f"dataset {config.data.name!r} needs a root (a path)")
    if config.data.device_cache and task != "classification":
        raise ConfigError("data.device_cache", f"only for classification datasets (cifar10, image_folder); model {config.model.name!r} is {task}")
    for i, name in enumerate(config.eval.metrics):
        if task not in METRICS[name][0]:
            raise ConfigError(f"eval.metrics[{i}]", f"metric {name!r} does not apply to {task} model {config.model.name!r}; "
                              f"expected one of {metrics_for(task)}")
    plateau = config.train.stop_on_plateau
    evaluated = list(config.eval.metrics) or list(TASKS[task].metrics)
    if plateau is not None and plateau.metric not in evaluated:
        raise ConfigError("train.stop_on_plateau.metric", f"expected one of the evaluated metrics {evaluated} "
                          f"(eval.metrics), got {plateau.metric!r}")
    if config.train.precision == "fp16" and use_cpu(config):
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
        if meta_model is not None:  # after the option checks, which name the key path
            _check_conversion_fits(meta_model, config.model.name, config.convert)
    if config.model.init is not None and training:
        try:
            ckpt.resolve_checkpoint(config.model.init)
        except ckpt.CheckpointError as error:
            raise ConfigError("model.init", str(error)) from None
    return task


def _check_model_values(config: Config) -> nn.Module | None:
    """Build the model on the meta device (no memory, no compute) so bad option values,
    nested ones included (``model.options.layer.breadth=0``), fail with the config check,
    naming the key path, instead of as a traceback when the trainer builds the model.
    Returns the meta model, or None where it cannot be built on the meta device."""
    from ..models import build_model as build

    options = config.model.options
    try:
        with torch.device("meta"):
            model = build(config.model.name, **copy.deepcopy(options))
    except (ValueError, TypeError) as error:
        raise ConfigError(_option_path(options, str(error)), str(error)) from None
    except (RuntimeError, NotImplementedError):  # not buildable on the meta device: built later for real
        return None
    return model


def _check_conversion_fits(model: nn.Module, model_name: str, cfg: ConvertConfig) -> None:
    """Convert the meta-device ``model`` as ``convert.step`` will, one matched conv at a time, so
    layer options that do not fit one of them (a lambda selector's heads must divide the conv's
    input channels) fail with the config check, naming the conv, not hours into training."""
    from ..convert import convert, include_matcher

    matches = include_matcher(cfg.include)
    names = [name for name, m in model.named_modules() if type(m) is nn.Conv2d and name and matches(name, m)]
    for name in names:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # convs convert skips are reported when it runs
                convert(model, to=cfg.to, include=[name], **cfg.layer_kwargs())
        except (ValueError, TypeError) as error:
            raise ConfigError("convert", f"converting {name!r} of model {model_name!r} to {cfg.to} fails: {error}") from None
        except (RuntimeError, NotImplementedError):  # not convertible on the meta device: checked when it runs
            return


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


def use_cpu(config: Config) -> bool:
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
    record = {"to": cfg.to, "include": list(cfg.include), "kwargs": cfg.layer_kwargs(), "step": step}
    if cfg.lr_scale != 1.0:  # read back by build_optimizer, so a resumed run rebuilds the same groups
        record["lr_scale"] = cfg.lr_scale
    if cfg.optimizer_state != "fresh":  # provenance only: the state is in every later checkpoint
        record["optimizer_state"] = cfg.optimizer_state
    return record


def build_experiment_model(config: Config, conversions: list[dict[str, Any]] = ()) -> nn.Module:
    """The model of ``config`` (``model.name`` and ``model.options``), then each conversion
    record applied in order (a checkpoint's ``conversions``), so weights saved after a staged
    conversion load into it."""
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
    model = build_experiment_model(config, meta.get("conversions", []))
    weights_file = path / (ckpt.EMA_FILE if ema and (path / ckpt.EMA_FILE).is_file() else ckpt.MODEL_FILE)
    load_model_weights(model, ckpt.load_weights(weights_file), str(weights_file))
    from .schedule import restore_annealed

    restore_annealed(model, meta.get("annealed"))  # annealed attributes are not weights
    return model, config, meta


def config_of_checkpoint(path: str | Path) -> Config:
    path = Path(path)
    for candidate in (path / "config.yaml", path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise FileNotFoundError(f"no config.yaml in {path} or its run directory; pass the config explicitly")



def to_channels_last(model: nn.Module) -> None:
    """Channels-last memory format for every 4-D parameter and buffer (``Module.to`` refuses
    models that also hold 5-D tensors, such as a switched conv's experts)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------- building
def build_split(config: Config, split: str, split_options: dict[str, Any]):
    """The dataset of ``split``: ``data.options`` and ``data.root``, then the split's own
    options (a split may have its own root); ``train.seed`` and ``data.on_bad_file`` go to the
    datasets that take them."""
    from ..data import DATASETS, build_dataset

    cfg = config.data
    accepted = DATASETS.options(cfg.name)
    options = dict(cfg.options)
    if cfg.root is not None:
        options["root"] = cfg.root
    options.update(split_options)  # a split may have its own root
    if accepted.accepts("seed"):
        options["seed"] = config.train.seed
    if accepted.accepts("on_bad_file"):
        options["on_bad_file"] = cfg.on_bad_file
    return build_dataset(cfg.name, split, **options)


def check_split_images(task: str, split: str, dataset, metric_names: list[str]) -> None:
    """Every image of an SR split must fit before the first step (a file that does not
    would otherwise crash the run at its first evaluation, or mid-epoch): at least
    ``scale`` (and the training ``patch_size``) pixels per side, and for ``psnr_y`` /
    ``ssim_y``, which shave ``scale`` pixels at each border, more than ``2 * scale``.
    Sizes come from the cache or the file headers. Raises DatasetError naming the file."""
    if task != "super_resolution" or not hasattr(dataset, "hr_sizes"):
        return
    from ..data import DatasetError

    scale, patch = int(dataset.scale), dataset.patch_size
    shaved = [m for m in metric_names if m in ("psnr_y", "ssim_y")] if split == "eval" else []
    for source, (h, w) in dataset.hr_sizes():
        side = min(h, w) if patch is None else min(h, w, patch)
        size = f"{h}x{w}" + (f" (cropped to a multiple of scale {scale})" if scale > 1 else "")
        if min(h, w) < max(scale, patch or 0):
            need = f"patch_size={patch}" if patch else f"scale={scale}"
            raise DatasetError(f"{split} image {source} is {size}, smaller than {need}; remove it "
                               "or set data.on_bad_file=skip")
        if shaved and side <= 2 * scale:
            raise DatasetError(f"eval image {source} is {size}: {'/'.join(shaved)} shave {scale} pixels at each "
                               f"border and need more than {2 * scale} pixels per side; remove it from the eval set")


def combine_loss_terms(loss_terms: Sequence[tuple[str, float, Any, bool]], outputs: dict, batch: dict,
                       model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of :func:`build_loss_terms`' terms and each (unweighted, detached)
    term. Terms with ``needs_model`` (translational consistency) are called as
    ``fn(model, batch, step)``, the others as ``fn(outputs, batch)``."""
    total, terms = 0.0, {}
    for name, weight, fn, needs_model in loss_terms:
        value = fn(model, batch, step) if needs_model else fn(outputs, batch)
        key = name if name not in terms else f"{name}_{len(terms)}"
        terms[key] = value.detach()
        total = total + weight * value.float()
    return total, terms


def build_loss_terms(config: Config, device: torch.device) -> list[tuple[str, float, Any, bool]]:
    """``[(name, weight, loss, needs_model)]`` of ``config.losses``, on ``device``."""
    from ..losses import build_loss

    terms = []
    for term in config.losses:
        fn = build_loss(term.name, **term.options)
        if isinstance(fn, nn.Module):
            fn.to(device)
        terms.append((term.name, term.weight, fn, bool(getattr(fn, "needs_model", False))))
    return terms


def optimizer_param_groups(model: nn.Module, lr: float, conversions: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer groups: group 0 at ``lr``, then one
    group per conversion record with an ``lr_scale`` (its converted layers at ``lr * lr_scale``).
    A parameter belongs to the last such conversion whose converted module names prefix it."""
    scaled = [(tuple(r["converted"]), float(r["lr_scale"])) for r in conversions
              if r.get("lr_scale", 1.0) != 1.0 and r.get("converted")]
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr}] + [{"params": [], "lr": lr * scale} for _, scale in scaled]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        index = 0
        for i, (modules, _) in enumerate(scaled, start=1):
            if any(name.startswith(m + ".") for m in modules):
                index = i
        groups[index]["params"].append(p)
    return [groups[0]] + [g for g in groups[1:] if g["params"]]


def build_optimizer(config: Config, model: nn.Module, conversions: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """``config.optim`` over the trainable parameters of ``model``; the layers of ``conversions``
    that carry an ``lr_scale`` (``convert.lr_scale``) get a group of their own."""
    o = config.optim
    params = optimizer_param_groups(model, o.lr, conversions)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def carry_optimizer_state(old: torch.optim.Optimizer, old_params: dict[str, nn.Parameter],
                          new: torch.optim.Optimizer, model: nn.Module, *, copy_into_experts: bool = False) -> None:
    """After a conversion, ``new`` (built over the converted ``model``) continues ``old``:
    the groups' learning rates, and the state of surviving parameters; a converted layer's
    parameter keeps the state of the one it replaces when name and shape agree (a switched
    conv's bias). With ``copy_into_experts``, a parameter of shape ``(E, *old.shape)`` under
    the old one's name (the experts copied from a conv's weight or bias) starts with the old
    state repeated for each expert (``convert.optimizer_state: copy``); otherwise it starts
    fresh. ``old_params``: the named parameters before the conversion."""
    base_lr = new.param_groups[0]["lr"]
    for i, group in enumerate(new.param_groups):
        # a group the conversion added keeps its multiple of the base rate (initial_lr drives the schedule)
        old_group = old.param_groups[i] if i < len(old.param_groups) else old.param_groups[0]
        factor = group["lr"] / base_lr if i >= len(old.param_groups) and base_lr > 0 else 1.0
        for key in ("initial_lr", "lr"):
            if key in old_group:
                group[key] = old_group[key] * factor
    for name, p in model.named_parameters():
        previous = old_params.get(name)
        if previous is None or previous not in old.state:
            continue
        if previous is p:
            new.state[p] = old.state[previous]
        elif previous.shape == p.shape:
            new.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in old.state[previous].items()}
        elif copy_into_experts and p.dim() == previous.dim() + 1 and p.shape[1:] == previous.shape:
            new.state[p] = {k: _repeat_for_experts(v, previous.shape, p.shape[0]) for k, v in old.state[previous].items()}


def _repeat_for_experts(value: Any, shape: torch.Size, experts: int) -> Any:
    """One optimizer-state entry of a parameter of ``shape``, repeated for ``experts`` copies
    (moments and buffers of that shape; a step count or other scalar is copied as is)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.shape == shape:
        return value.unsqueeze(0).repeat(experts, *([1] * value.dim()))
    return value.clone()


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
        cpu=use_cpu(config),
        step_scheduler_with_optimizer=False,
    )



# ---------------------------------------------------------------------------- model cost
DEFAULT_LR_SIZE = 48  # SR input when the data config names no patch size (match_flops' lr_size)
DEFAULT_IMAGE_SIZE = 32  # CIFAR-10


def dataset_defaults(config: Config) -> dict[str, Any]:
    """The options of ``config.data.name``'s builder that have a default, with those defaults
    (empty for a data set that is not registered)."""
    from ..data import DATASETS

    if config.data.name not in DATASETS:
        return {}
    return {k: v for k, v in DATASETS.options(config.data.name).defaults.items() if v is not inspect.Parameter.empty}


def input_normalisation(config: Config) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """``(mean, std)`` as ``(3, 1, 1)`` tensors that the run's data set normalised [0, 1]
    images with (its ``data.options``, else the data set's defaults), or ``(None, None)``:
    what a model must be fed outside the data pipeline (``dynconv viz``)."""
    options = {**dataset_defaults(config), **config.data.options}
    if options.get("mean") is None or options.get("std") is None:
        return None, None
    return (torch.tensor(options["mean"], dtype=torch.float32).view(3, 1, 1),
            torch.tensor(options["std"], dtype=torch.float32).view(3, 1, 1))


def default_input_size(config: Config) -> tuple[int, int, str]:
    """``(H, W, where it comes from)`` of the model input that costs are quoted for: the
    training crop (SR: ``patch_size / scale``, the LR patch), else the data's ``size``, else
    48 (SR LR) or 32 (CIFAR). CondConv's per-example cost is spread over these pixels."""
    from ..models import model_task

    defaults = dataset_defaults(config)

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
            "flops_per": TASKS[model_task(config.model.name)].flops_per, "input_size": [channels, int(h), int(w)],
            "input_size_from": source}
    if by_layer:
        cost["by_layer"] = summary["by_layer"]
    return cost


def format_cost(cost: dict[str, Any]) -> str:
    """One line: ``1,234 params, 5,678 FLOPs per HR output pixel (input 3x48x48)``."""
    return (f"{cost['params']:,} params, {cost['flops_per_pixel']:,.0f} FLOPs per {cost['flops_per']} "
            f"(input {'x'.join(map(str, cost['input_size']))})")

