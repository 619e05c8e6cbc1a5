"""Study files: a base config, variants x seeds x eval sets, profiles; checked before any run.

A study file is YAML::

    base: ../sr_plain_x2.yaml        # a normal config; relative to this file
    baseline: plain                  # the variant the others are compared against
    seeds: [0, 1, 2]
    eval_sets: {Set5: test/Set5}     # name -> folder, relative to data.root or absolute
    variants:
      plain: {}
      switched: {set: {model.name: sr_switched}, seeds: [0]}
      staged: {set: {convert.step: 2500}, branch_from: {variant: plain, step: 2500}}
    profiles:
      cpu: {set: {train.steps: 5000}, variants: {staged: {set: {convert.step: 1000}}}}

Each variant x seed becomes an ordinary config: ``base`` <- ``profile.set`` <- the variant's
``set`` <- the profile's per-variant ``set`` <- ``--set`` <- ``train.seed: k``. Every config
is validated like ``dynconv train`` would, and every eval folder must exist, before any
training starts; errors name the study key path.

Optional variant keys:

- ``branch_from: {variant, step}``: start from the parent variant's state (weights,
  optimizer, data position, RNG) after ``step`` steps of the same seed, instead of
  training those steps again. With ``convert.step == step`` this is staged training whose
  control is the parent itself (same data order, same step count).
- ``match_wallclock: {variant, probe_steps}``: choose ``train.steps`` so the run takes about
  as long as the named variant's run of the same seed (timed on ``probe_steps`` steps).
- ``control``: another variant this one is also compared against (paired by seed), e.g. a
  loss term against the same recipe without it.
- ``label`` / ``description``: shown in the results.

``branch_from.step`` may also be ``final`` (wherever the parent run ended: its
``train.stop_on_plateau`` stop, else its ``train.steps``) or ``plateau`` (the parent must have
stopped on its plateau rule, else the branch fails); ``branch_from.more_steps: M`` sets the
branch's ``train.steps`` to the branch step + M. ``${branch_step}`` in a variant's ``set``
(e.g. ``convert.step``) is the branch step, filled in when the branch starts.

``datasets`` (top level): ``{name: {label, description, set, eval_sets}}`` runs every variant on
every data set: run ``<dataset>/<variant>``, its config ``base`` <- ``profile.set`` <- the data
set's ``set`` <- the profile's per-data-set ``set`` (``profiles.P.datasets.D.set``) <- the
variant's ... ; baseline, control and branch parents are those of the same data set, and a run
is evaluated on the study's ``eval_sets`` and its data set's. A variant's ``datasets: [names]``
runs it on those data sets only (an attempt tried on one); its parent, match and control must
run there too, and the baseline runs on every data set. An eval set whose folder is
``null`` is the run's own eval split (``data.eval_split``, every batch). ``relative_change: true``
reports differences to the baseline / control as relative changes (in %) in results.md.

``vars`` (top level, overridden by a profile's ``vars``) name values that a ``set`` value or
``branch_from.step`` uses as ``${name}``, so a profile changes e.g. every branch step at
once. A profile's ``exclude`` lists variants it does not run. ``latency_batch_size`` (top
level): after each run, time an inference forward of its final checkpoint at this batch size
(:func:`dynconv.train.speed.forward_latency`); null or absent: not measured.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, apply_overrides, config_from_dict

STUDY_KEYS = {"name", "description", "base", "baseline", "seeds", "eval_sets", "variants", "profiles", "metrics", "vars",
              "datasets", "relative_change", "latency_batch_size"}
VARIANT_KEYS = {"set", "seeds", "branch_from", "match_wallclock", "label", "description", "control", "datasets"}
PROFILE_KEYS = {"set", "seeds", "variants", "description", "vars", "exclude", "datasets"}
DATASET_KEYS = {"label", "description", "set", "eval_sets"}
#: ``branch_from.step`` values that name where the parent run ended instead of a step
BRANCH_AT_END = ("final", "plateau")
#: the variable a branch's ``set`` uses for its branch step (known when it starts, for ``final``)
BRANCH_STEP = "${branch_step}"
_VAR = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
PROFILE_VARIANT_KEYS = {"set", "seeds", "branch_from", "match_wallclock"}


class StudyError(ConfigError):
    """A study file is malformed; the message names the study key path."""


@dataclass
class BranchFrom:
    """Where a branch starts: ``variant``'s run of the same seed after ``step`` steps, or where
    it ended (``step`` ``'final'`` / ``'plateau'``); ``more_steps``: train that many steps after it."""

    variant: str
    step: int | str
    more_steps: int | None = None

    @property
    def fixed(self) -> bool:
        """The branch step is known before the parent trains."""
        return isinstance(self.step, int)


def resolve_branch(config: dict[str, Any], branch: BranchFrom, step: int) -> dict[str, Any]:
    """``config`` of a branch starting at ``step``: every ``${branch_step}`` value replaced by
    ``step``, and ``train.steps`` = ``step + more_steps`` when ``more_steps`` is given."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return step if value == BRANCH_STEP else value

    config = fill(copy.deepcopy(config))
    if branch.more_steps is not None:
        config.setdefault("train", {})["steps"] = step + branch.more_steps
    return config


@dataclass
class MatchWallclock:
    variant: str
    probe_steps: int = 30


@dataclass
class RunPlan:
    """One variant x seed: its resolved config (a plain dict) and where it runs."""

    variant: str
    seed: int
    config: dict[str, Any]
    run_dir: Path
    branch_from: BranchFrom | None = None
    match_wallclock: MatchWallclock | None = None
    dataset: str | None = None  # the study's data set this run trains on (``datasets``), if any

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @property
    def total_steps(self) -> int | None:
        """``train.steps``; None for a branch from where its parent ends, until that is known."""
        if self.branch_from is not None and not self.branch_from.fixed:
            return None
        return self.config.get("train", {}).get("steps")


@dataclass
class StudyPlan:
    """A study file resolved for one profile: the runs to do, in order (parents first)."""

    name: str
    path: Path
    description: str
    baseline: str
    profile: str | None
    eval_sets: dict[str, Path]
    variants: dict[str, dict[str, Any]]  # name -> {"label", "description"}
    runs: list[RunPlan]
    out: Path
    metrics: list[str] = field(default_factory=list)
    relative_change: bool = False  # results.md: differences to baseline / control in % of theirs
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"label", "description"}
    latency_batch_size: int | None = None  # forward latency measured after each run at this batch (None: not)

    def baseline_of(self, variant: str) -> str:
        """The variant ``variant`` is compared against: the baseline (of its data set)."""
        return self.variants.get(variant, {}).get("baseline") or self.baseline

    def eval_sets_of(self, variant: str) -> dict[str, Path | None]:
        """The eval sets ``variant``'s runs are scored on (name -> folder; None: the run's own
        eval split): the study's, and its data set's."""
        names = self.variants.get(variant, {}).get("eval_sets")
        return dict(self.eval_sets) if names is None else {n: self.eval_sets[n] for n in names}

    def run(self, variant: str, seed: int) -> RunPlan | None:
        for plan in self.runs:
            if plan.variant == variant and plan.seed == seed:
                return plan
        return None


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON (first 16 hex digits): which runs are the same."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------- parsing
def _variant_datasets(value: Any, datasets: dict[str, Any], path: str) -> list[str] | None:
    """A variant's ``datasets``: None (every data set) or a non-empty list of known names."""
    if value is None:
        return None
    if not datasets:
        raise StudyError(path, "only a study with top-level datasets can limit a variant to some of them")
    if not isinstance(value, list) or not value or any(d not in datasets for d in value):
        raise StudyError(path, f"expected a non-empty list of data sets (of {sorted(datasets)}), got {value!r}")
    return [str(d) for d in value]


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _unknown(keys, allowed: set[str], path: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise StudyError(f"{path}.{extra[0]}" if path else extra[0], f"unknown key; expected one of {sorted(allowed)}")


def _seeds(value: Any, path: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise StudyError(path, f"expected a non-empty list of integer seeds, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(path, f"seeds repeat: {value!r}")
    return list(value)


def parse_seeds(text: str) -> list[int]:
    """``'0,1,2'`` -> ``[0, 1, 2]`` (the ``--seeds`` option)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise StudyError("--seeds", f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    return _seeds(seeds, "--seeds")


def _substitute(value: Any, variables: dict[str, Any], path: str) -> Any:
    """``${name}`` strings replaced by ``variables[name]`` (any depth; types kept)."""
    if isinstance(value, str):
        m = _VAR.match(value)
        if m is None:
            return value
        if m.group(1) not in variables:
            raise StudyError(path, f"unknown variable ${{{m.group(1)}}}; defined: {sorted(variables)}")
        return copy.deepcopy(variables[m.group(1)])
    if isinstance(value, dict):
        return {k: _substitute(v, variables, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _set_items(value: Any, path: str, variables: dict[str, Any] | None = None) -> list[str]:
    """A ``set`` mapping ``{key.path: value}`` as ``--set`` strings (values dumped as YAML)."""
    items = []
    value = _substitute(_mapping(value, path), variables or {}, path)
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise StudyError(path, f"keys must be dotted config paths such as train.steps, got {key!r}")
        items.append(f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return items


def _branch(value: Any, path: str) -> BranchFrom | None:
    if value is None:
        return None
    value = _mapping(value, path)
    _unknown(value, {"variant", "step", "more_steps"}, path)
    variant, step, more = value.get("variant"), value.get("step"), value.get("more_steps")
    if not isinstance(variant, str):
        raise StudyError(f"{path}.variant", f"expected the name of another variant, got {variant!r}")
    if step not in BRANCH_AT_END and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        raise StudyError(f"{path}.step", f"expected a step >= 1 or one of {list(BRANCH_AT_END)}, got {step!r}")
    if more is not None and (not isinstance(more, int) or isinstance(more, bool) or more < 1):
        raise StudyError(f"{path}.more_steps", f"expected a number of steps >= 1 after the branch point, got {more!r}")
    if more is None and step in BRANCH_AT_END:
        raise StudyError(f"{path}.more_steps", f"a branch from the parent's {step!r} step needs more_steps "
                         "(how many steps it trains after the branch point)")
    return BranchFrom(variant, step, more)


def _match(value: Any, path: str) -> MatchWallclock | None:
    if value is None:
        return None
    value = _mapping(value, path)
    _unknown(value, {"variant", "probe_steps"}, path)
    variant, probe = value.get("variant"), value.get("probe_steps", 30)
    if not isinstance(variant, str):
        raise StudyError(f"{path}.variant", f"expected the name of another variant, got {variant!r}")
    if not isinstance(probe, int) or isinstance(probe, bool) or probe < 5:
        raise StudyError(f"{path}.probe_steps", f"expected an integer >= 5, got {probe!r}")
    return MatchWallclock(variant, probe)


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """data.root and model.init made absolute (relative to the working directory, as
    ``dynconv train`` reads them), so run directories do not depend on where they are used."""
    data = config.get("data") or {}
    for section in (data, data.get("train_options") or {}, data.get("eval_options") or {}):
        root = section.get("root")
        if isinstance(root, str) and root:
            section["root"] = str(Path(root).expanduser().resolve())
    model = config.get("model") or {}
    if isinstance(model.get("init"), str):
        model["init"] = str(Path(model["init"]).expanduser().resolve())
    return config


def eval_folder(config: dict[str, Any], folder: str | Path) -> Path:
    """An eval set's folder: absolute, or relative to the config's ``data.root``."""
    folder = Path(folder).expanduser()
    if folder.is_absolute():
        return folder
    root = (config.get("data") or {}).get("root")
    return (Path(root) / folder) if root else folder.resolve()


def load_study(
    path: str | Path,
    *,
    profile: str | None = None,
    out: str | Path | None = None,
    only: list[str] | None = None,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    check: bool = True,
) -> StudyPlan:
    """Read and check a study file; return the plan of every run (parents before branches).

    ``only`` restricts to the named variants (plus the baseline's and the parents' runs they
    need); ``datasets`` restricts a study with top-level ``datasets`` to the named ones (e.g. to
    finish one data set's runs without the others'); ``seeds`` replaces every variant's seeds;
    ``overrides`` are ``--set`` items applied to every run. With ``check`` every run's config
    is validated as ``dynconv train`` would.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyError("", f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    raw = _mapping(raw, "")
    _unknown(raw, STUDY_KEYS, "")
    name = str(raw.get("name") or path.stem)
    # -- base config
    if "base" not in raw:
        raise StudyError("base", "required key is missing (a config file, relative to the study file)")
    base_path = (path.parent / str(raw["base"])).resolve()
    if not base_path.is_file():
        raise StudyError("base", f"config file not found: {base_path}")
    try:
        base = yaml.safe_load(base_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise StudyError("base", f"{base_path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(base, dict):
        raise StudyError("base", f"{base_path}: expected a mapping at the top level")
    # -- variants
    variants_raw = _mapping(raw.get("variants"), "variants")
    if not variants_raw:
        raise StudyError("variants", "expected at least one variant")
    default_seeds = _seeds(raw.get("seeds", [0]), "seeds")
    baseline = raw.get("baseline")
    if baseline not in variants_raw:
        raise StudyError("baseline", f"expected one of the variants {sorted(variants_raw)}, got {baseline!r}")
    eval_sets_raw = _mapping(raw.get("eval_sets"), "eval_sets")
    own_split_sets = [str(n) for n, folder in eval_sets_raw.items() if folder is None]  # the run's own eval split
    eval_sets_raw = {n: folder for n, folder in eval_sets_raw.items() if folder is not None}
    datasets_raw = _mapping(raw.get("datasets"), "datasets")
    for dname, d in datasets_raw.items():
        if not isinstance(dname, str) or not dname.replace("_", "").replace("-", "").isalnum():
            raise StudyError(f"datasets.{dname}", "data set names may hold letters, digits, '-' and '_' only (they name directories)")
        _unknown(_mapping(d, f"datasets.{dname}"), DATASET_KEYS, f"datasets.{dname}")
    relative_change = raw.get("relative_change", False)
    if not isinstance(relative_change, bool):
        raise StudyError("relative_change", f"expected true or false, got {relative_change!r}")
    metrics = raw.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise StudyError("metrics", f"expected a list of metric names, got {metrics!r}")
    latency_batch_size = raw.get("latency_batch_size")
    if latency_batch_size is not None and (isinstance(latency_batch_size, bool) or not isinstance(latency_batch_size, int)
                                           or latency_batch_size < 1):
        raise StudyError("latency_batch_size", f"expected a batch size >= 1 (null: not measured), got {latency_batch_size!r}")
    # -- profile
    profiles = _mapping(raw.get("profiles"), "profiles")
    prof: dict[str, Any] = {}
    if profile is not None:
        if profile not in profiles:
            raise StudyError("--profile", f"unknown profile {profile!r}; expected one of {sorted(profiles)}")
        prof = _mapping(profiles[profile], f"profiles.{profile}")
        _unknown(prof, PROFILE_KEYS, f"profiles.{profile}")
    for pname, p in profiles.items():  # check every profile's shape, not only the chosen one
        p = _mapping(p, f"profiles.{pname}")
        _unknown(p, PROFILE_KEYS, f"profiles.{pname}")
        for vname, v in _mapping(p.get("variants"), f"profiles.{pname}.variants").items():
            if vname not in variants_raw:
                raise StudyError(f"profiles.{pname}.variants.{vname}", f"unknown variant; expected one of {sorted(variants_raw)}")
            _unknown(_mapping(v, f"profiles.{pname}.variants.{vname}"), PROFILE_VARIANT_KEYS, f"profiles.{pname}.variants.{vname}")
        for dname, d in _mapping(p.get("datasets"), f"profiles.{pname}.datasets").items():
            if dname not in datasets_raw:
                raise StudyError(f"profiles.{pname}.datasets.{dname}", f"unknown data set; expected one of {sorted(datasets_raw)}")
            _unknown(_mapping(d, f"profiles.{pname}.datasets.{dname}"), {"set"}, f"profiles.{pname}.datasets.{dname}")
    variables = {**_mapping(raw.get("vars"), "vars"), **_mapping(prof.get("vars"), f"profiles.{profile}.vars")}
    profile_set = _set_items(prof.get("set"), f"profiles.{profile}.set", variables)
    exclude = prof.get("exclude") or []
    if not isinstance(exclude, list) or any(v not in variants_raw for v in exclude):
        raise StudyError(f"profiles.{profile}.exclude", f"expected a list of variants (of {sorted(variants_raw)}), got {exclude!r}")
    if baseline in exclude:
        raise StudyError(f"profiles.{profile}.exclude", f"the baseline {baseline!r} cannot be excluded")
    if "seeds" in prof:
        default_seeds = _seeds(prof["seeds"], f"profiles.{profile}.seeds")
    profile_variants = _mapping(prof.get("variants"), f"profiles.{profile}.variants")
    if only:
        unknown = [v for v in only if v not in variants_raw]
        if unknown:
            raise StudyError("--only", f"unknown variant {unknown[0]!r}; expected one of {sorted(variants_raw)}")
    if datasets is not None:
        if not datasets_raw:
            raise StudyError("--datasets", "only a study with top-level datasets can run some of them")
        unknown = [d for d in datasets if d not in datasets_raw]
        if unknown or not datasets:
            raise StudyError("--datasets", f"expected data sets of {sorted(datasets_raw)}, got {datasets!r}")
    run_datasets = {d: v for d, v in datasets_raw.items() if datasets is None or d in datasets}
    out = Path(out) if out is not None else Path("runs") / "studies" / (name + (f"-{profile}" if profile else ""))
    # -- per variant
    resolved: dict[str, dict[str, Any]] = {}
    for vname, v in variants_raw.items():
        vpath = f"variants.{vname}"
        if not isinstance(vname, str) or not vname.replace("_", "").replace("-", "").isalnum():
            raise StudyError(vpath, "variant names may hold letters, digits, '-' and '_' only (they name directories)")
        v = _mapping(v, vpath)
        _unknown(v, VARIANT_KEYS, vpath)
        pv = _mapping(profile_variants.get(vname), f"profiles.{profile}.variants.{vname}")
        branch = _branch(_substitute(pv.get("branch_from", v.get("branch_from")), variables, f"{vpath}.branch_from"),
                         f"{vpath}.branch_from")
        # a branch's set may use its branch step; from the parent's end it is filled in when the branch starts
        branch_vars = {**variables, "branch_step": branch.step if branch.fixed else BRANCH_STEP} if branch else variables
        entry = {
            "set": _set_items(v.get("set"), f"{vpath}.set", branch_vars),
            "profile_set": _set_items(pv.get("set"), f"profiles.{profile}.variants.{vname}.set", branch_vars),
            "seeds": _seeds(pv.get("seeds", v.get("seeds", default_seeds)), f"{vpath}.seeds"),
            "branch_from": branch,
            "control": v.get("control"),
            "match": _match(pv.get("match_wallclock", v.get("match_wallclock")), f"{vpath}.match_wallclock"),
            "label": str(v.get("label", vname)),
            "description": str(v.get("description", "")),
            "datasets": _variant_datasets(v.get("datasets"), datasets_raw, f"{vpath}.datasets"),
        }
        if seeds is not None:
            entry["seeds"] = list(seeds)
        if entry["control"] is not None and (entry["control"] not in variants_raw or entry["control"] == vname):
            raise StudyError(f"{vpath}.control", f"expected another variant, one of {sorted(set(variants_raw) - {vname})}, got {entry['control']!r}")
        for key, ref in (("branch_from", entry["branch_from"]), ("match_wallclock", entry["match"])):
            if ref is not None and (ref.variant not in variants_raw or ref.variant == vname):
                raise StudyError(f"{vpath}.{key}.variant", f"expected another variant, one of {sorted(set(variants_raw) - {vname})}, got {ref.variant!r}")
        resolved[vname] = entry
    if resolved[baseline]["datasets"] is not None:
        raise StudyError(f"variants.{baseline}.datasets", "the baseline runs on every data set; remove its datasets")
    for vname, entry in resolved.items():  # what a variant is compared with or starts from runs where it does
        for key, other in (("branch_from.variant", entry["branch_from"] and entry["branch_from"].variant),
                           ("match_wallclock.variant", entry["match"] and entry["match"].variant),
                           ("control", entry["control"])):
            theirs = None if other is None else resolved[other]["datasets"]
            if theirs is None:  # no reference, or one that runs everywhere
                continue
            if entry["datasets"] is None:
                raise StudyError(f"variants.{vname}.{key}", f"{other!r} runs only on {theirs}; give {vname!r} the same datasets")
            missing = sorted(set(entry["datasets"]) - set(theirs))
            if missing:
                raise StudyError(f"variants.{vname}.{key}", f"{other!r} does not run on {missing}, where {vname!r} does")
    # parents must not themselves branch (one level keeps the data order argument simple)
    for vname, entry in resolved.items():
        ref = entry["branch_from"]
        if ref is not None and resolved[ref.variant]["branch_from"] is not None:
            raise StudyError(f"variants.{vname}.branch_from.variant", f"{ref.variant!r} itself branches; branch from a variant that trains from scratch")
    # -- which variants run
    selected = [v for v in variants_raw if v not in exclude] if not only else list(dict.fromkeys([baseline, *only]))
    for vname in list(selected):
        for ref in (resolved[vname]["branch_from"], resolved[vname]["match"]):
            if ref is not None and ref.variant not in selected:
                selected.insert(0, ref.variant)
    # -- configs, in the file's order, each variant after the variants it branches from or matches
    order: list[str] = []
    for vname in selected:
        refs = [r.variant for r in (resolved[vname]["branch_from"], resolved[vname]["match"]) if r is not None]
        order += [r for r in refs if r not in order]
        if vname not in order:
            order.append(vname)
    runs: list[RunPlan] = []
    # without ``datasets`` one pass with the names as they are; with, one pass per data set
    # and every name (run, parent, control, baseline) prefixed with the data set's
    profile_datasets = _mapping(prof.get("datasets"), f"profiles.{profile}.datasets")
    passes = [(None, [])] if not datasets_raw else [
        (dname, [*_set_items(_mapping(d, f"datasets.{dname}").get("set"), f"datasets.{dname}.set", variables),
                 *_set_items(_mapping(profile_datasets.get(dname), f"profiles.{profile}.datasets.{dname}").get("set"),
                             f"profiles.{profile}.datasets.{dname}.set", variables)])
        for dname, d in run_datasets.items()]
    expanded: dict[str, dict[str, Any]] = {}
    for dname, dataset_set in passes:
        named = (lambda v: v) if dname is None else (lambda v, _d=dname: f"{_d}/{v}")
        for vname in order:
            entry = resolved[vname]
            if dname is not None and entry["datasets"] is not None and dname not in entry["datasets"]:
                continue
            branch, match = entry["branch_from"], entry["match"]
            if branch is not None:
                branch = BranchFrom(named(branch.variant), branch.step, branch.more_steps)
            if match is not None:
                match = MatchWallclock(named(match.variant), match.probe_steps)
            expanded[named(vname)] = {**entry, "control": named(entry["control"]) if entry["control"] else None,
                                      "baseline": named(baseline), "dataset": dname}
            for seed in entry["seeds"]:
                items = [*profile_set, *dataset_set, *entry["set"], *entry["profile_set"], *(overrides or []),
                         f"train.seed={seed}"]
                try:
                    data = apply_overrides(copy.deepcopy(base), items)
                except ConfigError as error:
                    raise StudyError(f"variants.{vname}.set", str(error)) from None
                data = _absolute_paths(data)
                if branch is not None and branch.fixed:
                    data = resolve_branch(data, branch, branch.step)
                runs.append(RunPlan(named(vname), seed, data, out / "runs" / named(vname) / f"seed{seed}", branch, match,
                                    dname))
    if run_datasets:
        for dname, d in run_datasets.items():
            label = str(_mapping(d, f"datasets.{dname}").get("label", dname))
            for vname in order:
                if f"{dname}/{vname}" in expanded:
                    expanded[f"{dname}/{vname}"]["label"] = f"{resolved[vname]['label']} ({label})"
    plan = StudyPlan(
        name=name, path=path.resolve(), description=str(raw.get("description", "")), baseline=baseline, profile=profile,
        eval_sets={}, variants={v: {"label": e["label"], "description": e["description"], "seeds": e["seeds"],
                                    "control": e["control"], "baseline": e["baseline"], "dataset": e["dataset"]}
                                for v, e in expanded.items()},
        runs=runs, out=out, metrics=list(metrics), relative_change=relative_change,
        datasets={d: {"label": str(_mapping(v, f"datasets.{d}").get("label", d)),
                      "description": str(_mapping(v, f"datasets.{d}").get("description", ""))} for d, v in run_datasets.items()},
        latency_batch_size=latency_batch_size,
    )
    # -- eval sets (resolved against the baseline's data.root)
    base_run = runs[0].config
    for set_name, folder in eval_sets_raw.items():
        if not isinstance(folder, (str, Path)):
            raise StudyError(f"eval_sets.{set_name}", f"expected a folder path, got {folder!r}")
        resolved_folder = eval_folder(base_run, folder)
        if check and not _is_eval_set(resolved_folder):
            raise StudyError(f"eval_sets.{set_name}", f"folder (or .tar/.tar.gz of one) not found: {resolved_folder} "
                             "(relative paths are relative to data.root)")
        plan.eval_sets[str(set_name)] = resolved_folder.resolve() if resolved_folder.exists() else resolved_folder
    for set_name in own_split_sets:  # scored on each run's own eval split
        plan.eval_sets[set_name] = None
    common = list(plan.eval_sets)
    for dname, d in run_datasets.items():
        first = next(r for r in runs if r.dataset == dname).config
        names = []
        for set_name, folder in _mapping(_mapping(d, f"datasets.{dname}").get("eval_sets"), f"datasets.{dname}.eval_sets").items():
            where = f"datasets.{dname}.eval_sets.{set_name}"
            if str(set_name) in plan.eval_sets:
                raise StudyError(where, "eval set names must be unique across the study and its data sets")
            if folder is not None and not isinstance(folder, (str, Path)):
                raise StudyError(where, f"expected a folder path or null (the run's own eval split), got {folder!r}")
            resolved_folder = eval_folder(first, folder) if folder is not None else None
            if check and resolved_folder is not None and not resolved_folder.exists():
                raise StudyError(where, f"not found: {resolved_folder} (relative paths are relative to the data set's data.root)")
            plan.eval_sets[str(set_name)] = resolved_folder
            names.append(str(set_name))
        for variant, info in plan.variants.items():
            if info["dataset"] == dname:
                info["eval_sets"] = [*common, *names]
    if check:
        check_plan(plan)
    return plan


def _is_eval_set(folder: Path) -> bool:
    from ..train.evaluation import eval_set_split

    try:
        eval_set_split(folder)
    except FileNotFoundError:
        return False
    return True


def check_plan(plan: StudyPlan) -> None:
    """Validate every run's config as ``dynconv train`` would (names, options, types), and
    the branch points (the parent runs the same seed and reaches the step)."""
    from ..train.experiment import check_config

    for run in plan.runs:
        where = f"variants.{run.variant.split('/', 1)[1] if run.dataset else run.variant}"  # the study file's key
        branch = run.branch_from
        parent = plan.run(branch.variant, run.seed) if branch is not None else None
        checked = run.config
        if branch is not None and not branch.fixed and parent is not None:
            # check the config the branch will get were the parent to end at its train.steps
            checked = resolve_branch(run.config, branch, int(parent.config.get("train", {}).get("steps") or 1))
        try:
            config = config_from_dict(checked)
            check_config(config, training=True)
        except ConfigError as error:
            raise StudyError(f"{where} (seed {run.seed}): {error.path}", str(error).split(": ", 1)[-1]) from None
        if branch is not None and parent is None:
            raise StudyError(f"{where}.seeds", f"seed {run.seed} has no run of {branch.variant!r} to branch from")
        if branch is not None and not branch.fixed:
            _check_branch_from_end(run, parent, where)
        elif run.branch_from is not None:
            steps = parent.total_steps
            if steps is not None and run.branch_from.step >= steps:
                raise StudyError(f"{where}.branch_from.step", f"expected a step below {run.branch_from.variant!r}'s train.steps ({steps}), got {run.branch_from.step}")
            conv = run.config.get("convert") or {}
            if conv and conv.get("step") is not None and conv["step"] < run.branch_from.step:
                raise StudyError(f"{where}.branch_from.step", f"the branch starts at step {run.branch_from.step}, after convert.step {conv['step']}")
        if run.match_wallclock is not None and plan.run(run.match_wallclock.variant, run.seed) is None:
            raise StudyError(f"{where}.match_wallclock.variant", f"seed {run.seed} has no run of {run.match_wallclock.variant!r} to match")


def _check_branch_from_end(run: RunPlan, parent: RunPlan, where: str) -> None:
    """A branch from where its parent ends (``final`` / ``plateau``): the parent has the rule a
    ``plateau`` branch needs, the branch has none (the parent's plateau is where it starts: it
    would stop at once), and a conversion happens at the branch step."""
    branch = run.branch_from
    if branch.step == "plateau" and not (parent.config.get("train") or {}).get("stop_on_plateau"):
        raise StudyError(f"{where}.branch_from.step", f"'plateau' needs {branch.variant!r} to set train.stop_on_plateau")
    if (run.config.get("train") or {}).get("stop_on_plateau"):
        raise StudyError(f"{where}.set", "a branch from its parent's end must not set train.stop_on_plateau "
                         "(it starts at the parent's plateau and would stop at once); it trains branch_from.more_steps")
    conv = run.config.get("convert") or {}
    if conv and conv.get("step") != BRANCH_STEP:
        raise StudyError(f"{where}.set", f"convert.step must be {BRANCH_STEP!r} in a branch from its parent's "
                         f"{branch.step!r} step (the step is known only when the parent ends), got {conv.get('step')!r}")
