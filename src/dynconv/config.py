"""Experiment configs: YAML validated into typed dataclasses before anything runs.

Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the key path
(``train.batch_size``) and what is expected, so a typo fails in a second, not after an hour.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or '<config>'}: {message}")
        self.path = path


# ------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` / ``1e3`` as numbers: PyYAML follows YAML 1.1,
    whose floats need a dot, so ``--set optim.lr=1e-3`` would otherwise be a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line/column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def parse_yaml(text: str, where: str = "") -> Any:
    """Parse YAML (``1e-3`` is a number); malformed text raises :class:`ConfigError` naming
    ``where`` (a key path or a file) and the problem, in one line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(where, f"malformed YAML: {_yaml_problem(error)}") from None


# ---------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """``name`` from :data:`dynconv.models.MODELS`; ``options`` are its keyword arguments.
    ``init``: a checkpoint (directory, run directory or ``model.safetensors``) whose weights the
    model starts from, its conversions applied first (e.g. the output of ``dynconv convert``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    init: Optional[str] = None


@dataclass
class DataConfig:
    """``name`` from :data:`dynconv.data.DATASETS`; ``options`` go to the dataset for both splits,
    ``train_options`` / ``eval_options`` to one split only."""

    name: str
    root: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)
    eval_options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "test"
    num_workers: int = 0
    device_cache: bool = False
    on_bad_file: Literal["error", "skip"] = "error"

    def validate(self, path: str) -> None:
        _at_least(self.num_workers, 0, f"{path}.num_workers")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: Optional[float] = None

    def validate(self, path: str) -> None:
        _positive(self.lr, f"{path}.lr")
        _at_least(self.weight_decay, 0.0, f"{path}.weight_decay")
        if self.grad_clip is not None:
            _positive(self.grad_clip, f"{path}.grad_clip")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps, after ``warmup_steps`` of linear warm-up."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0

    def validate(self, path: str) -> None:
        _at_least(self.warmup_steps, 0, f"{path}.warmup_steps")
        if self.milestones != sorted(self.milestones):
            raise ConfigError(f"{path}.milestones", f"expected increasing steps, got {self.milestones}")


@dataclass
class AnnealConfig:
    """A layer attribute moved linearly from ``start`` to ``end`` over the first ``steps`` (or
    ``epochs``) optimizer steps, then held at ``end``: Dynamic Convolution's softmax
    ``temperature`` (30 -> 1 over the first 10 of 100 epochs in its paper). Like the learning
    rate it is a function of the step alone, so a resumed run continues it exactly. ``include``:
    module-name globs of the layers it sets (default: every layer with the attribute)."""

    start: float
    end: float
    attribute: Literal["temperature"] = "temperature"
    steps: Optional[int] = None
    epochs: Optional[int] = None
    include: list[str] = field(default_factory=lambda: ["*"])

    def validate(self, path: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"{path}.steps", f"give exactly one of steps or epochs, got steps={self.steps}, epochs={self.epochs}")
        length, key = (self.steps, "steps") if self.steps is not None else (self.epochs, "epochs")
        _at_least(length, 1, f"{path}.{key}")
        _positive(self.start, f"{path}.start")  # a temperature divides the logits
        _positive(self.end, f"{path}.end")
        if not self.include:
            raise ConfigError(f"{path}.include", "expected at least one module-name pattern, e.g. ['*']")


@dataclass
class LossConfig:
    """One term of the weighted loss: ``name`` from :data:`dynconv.losses.LOSSES`."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlateauConfig:
    """``train.stop_on_plateau``: "trained to convergence" as a stop condition. After each
    evaluation, eval ``metric`` counts as improved when it beats the reference value (the last
    value that counted, at first the first evaluation) by at least ``min_rel_improvement`` of
    it (0.005: 0.5%), in the metric's direction (lower is better for losses, higher for PSNR);
    training stops after ``patience`` evaluations in a row without such an improvement, but
    not before step ``min_steps``. ``train.steps`` (or ``epochs``) stays the cap. The stop is
    logged (event ``plateau``), recorded in the last checkpoint's meta (``stopped``) and in
    ``metrics.json``; the rule's state is saved with every checkpoint, so a resumed run
    continues it exactly."""

    metric: str
    min_rel_improvement: float = 0.005
    patience: int = 5
    min_steps: int = 0

    def validate(self, path: str) -> None:
        if not 0.0 <= self.min_rel_improvement < 1.0:
            raise ConfigError(f"{path}.min_rel_improvement",
                              f"expected a relative improvement in [0, 1) such as 0.005 (0.5%), got {self.min_rel_improvement}")
        _at_least(self.patience, 1, f"{path}.patience")
        _at_least(self.min_steps, 0, f"{path}.min_steps")


@dataclass
class TrainConfig:
    """Give ``steps`` (optimizer steps) or ``epochs``. ``accumulate`` micro-batches of
    ``batch_size`` make one optimizer step. ``ema`` is the decay of a weight EMA (None: off).
    ``stop_on_plateau`` (:class:`PlateauConfig`) may end training earlier, once an eval metric
    has stopped improving."""

    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: int = 64
    accumulate: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    ema: Optional[float] = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stop_on_plateau: Optional[PlateauConfig] = None

    def validate(self, path: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"{path}.steps", f"give exactly one of steps or epochs, got steps={self.steps}, epochs={self.epochs}")
        if self.steps is not None:
            _at_least(self.steps, 1, f"{path}.steps")
        if self.epochs is not None:
            _at_least(self.epochs, 1, f"{path}.epochs")
        _at_least(self.batch_size, 1, f"{path}.batch_size")
        _at_least(self.accumulate, 1, f"{path}.accumulate")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"{path}.ema", f"expected a decay in (0, 1) or null, got {self.ema}")


@dataclass
class ConvertConfig:
    """Staged training: at optimizer step ``step``, convert the convs matching ``include``.

    ``lr_scale`` multiplies the learning rate of the converted layers' parameters (experts,
    selector, bias) from the conversion on: the new experts start as copies of a kernel trained
    at the full rate while the schedule has already decayed, and each sees only its share of
    the pixels, so they may need a larger step to specialise.

    ``optimizer_state``: what the new expert weights (and CondConv's per-expert biases) start
    with. ``fresh``: empty state, so Adam's first step moves every expert weight by about the
    full learning rate, whatever its gradient - a jolt to a converged net. ``copy``: each expert
    starts with the state (Adam moments, momentum buffer, step count) of the kernel it was
    copied from, so training continues as if the conv had not been split."""

    step: int
    to: Literal["switched", "condconv"] = "switched"
    include: list[str] = field(default_factory=lambda: ["*"])
    breadth: int = 8
    selector: str = "conv1x1"
    options: dict[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0
    optimizer_state: Literal["fresh", "copy"] = "fresh"

    def validate(self, path: str) -> None:
        _at_least(self.step, 0, f"{path}.step")
        _at_least(self.breadth, 1, f"{path}.breadth")
        if not self.lr_scale > 0:
            raise ConfigError(f"{path}.lr_scale", f"expected a learning-rate multiplier > 0, got {self.lr_scale}")

    def layer_kwargs(self) -> dict[str, Any]:
        if self.to == "switched":
            return {"breadth": self.breadth, "selector": self.selector, **self.options}
        return {"num_experts": self.breadth, **self.options}


@dataclass
class EvalConfig:
    every: int = 1000
    batch_size: int = 1
    metrics: list[str] = field(default_factory=list)
    best_metric: Optional[str] = None
    best_mode: Literal["max", "min"] = "max"
    max_batches: Optional[int] = None

    def validate(self, path: str) -> None:
        _at_least(self.every, 1, f"{path}.every")
        _at_least(self.batch_size, 1, f"{path}.batch_size")
        if self.best_metric is not None and self.best_metric not in self.metrics:
            raise ConfigError(f"{path}.best_metric", f"expected one of eval.metrics {self.metrics}, got {self.best_metric!r}")


@dataclass
class LogConfig:
    every: int = 50
    tensorboard: bool = True
    images_every: Optional[int] = None
    checkpoint_every: int = 1000
    keep_last: int = 3
    progress: bool = True

    def validate(self, path: str) -> None:
        _at_least(self.every, 1, f"{path}.every")
        _at_least(self.checkpoint_every, 1, f"{path}.checkpoint_every")
        _at_least(self.keep_last, 1, f"{path}.keep_last")


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    losses: list[LossConfig]
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    convert: Optional[ConvertConfig] = None
    anneal: list[AnnealConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, path: str) -> None:
        if not self.losses:
            raise ConfigError("losses", "expected at least one loss term")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# ------------------------------------------------------------------------- validation
def _positive(value: float, path: str) -> None:
    if not value > 0:
        raise ConfigError(path, f"expected a value > 0, got {value}")


def _at_least(value: float, minimum: float, path: str) -> None:
    if value < minimum:
        raise ConfigError(path, f"expected a value >= {minimum}, got {value}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, f"expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"expected {_describe(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list ({_describe(tp)}), got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(path, f"expected a list of {len(items)} ({_describe(tp)}), got {value!r}")
        return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e3 (YAML reads a float)
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in the dataclasses


def _dataclass_from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(where, f"unknown key; expected one of {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            values[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(where, f"required key is missing ({_describe(hints[name])})")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- loading
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(key, f"override must look like key.path=value, got {item!r}")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"cannot set {key!r}: this key holds {child!r}, not a mapping")
            node = child
        node[parts[-1]] = parse_yaml(raw, key) if raw != "" else ""
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    import copy

    data = apply_overrides(copy.deepcopy(data), list(overrides or []))
    return _dataclass_from_dict(Config, data, "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or a run directory's ``config.yaml``), apply ``--set`` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return config_from_dict(data, overrides)


def save_config(config: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
