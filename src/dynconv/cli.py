"""The ``dynconv`` command line (also ``python -m dynconv``): train, eval, convert, viz, info, demo.

Run ``dynconv COMMAND --help`` for each command's options and examples.
"""

from __future__ import annotations

import argparse
import errno
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by SIGTERM after saving a checkpoint

_FMT = argparse.RawDescriptionHelpFormatter

MAIN_EPILOG = """\
commands:
  train     train a model from a YAML config (resume with --resume RUN_DIR)
  eval      score a run or checkpoint on the eval split; writes metrics.json
  convert   checkpoint surgery: plain convs -> switched / CondConv, same outputs
  viz       selector maps and expert-usage charts of a trained model on images
  info      params and FLOPs per output pixel of a config's / run's / checkpoint's model
  study     variants x seeds x eval sets from a study file: results table, report (docs/studies.md)
  demo      the main job: staged training in miniature (plain SR net -> switched / CondConv vs the plain control)

examples:
  dynconv train configs/sr_switched_x2.yaml --set train.steps=2000 --run-dir runs/sr
  dynconv train configs/sr_switched_x2.yaml --resume runs/sr
  accelerate launch --multi_gpu --num_processes 4 -m dynconv train configs/cifar10_resnet18_switched.yaml
  dynconv eval runs/sr
  dynconv convert runs/plain --to switched --include 'body.*' --breadth 8 --selector lambda -o runs/plain-switched
  dynconv viz runs/sr photo.png -o runs/sr/maps
  dynconv info configs/sr_switched_x2.yaml --by-layer
  dynconv demo --quick

Docs: docs/training.md (configs, resume, staged training, multi-GPU / multi-node).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynconv", formatter_class=_FMT,
        description="Train, evaluate, convert and inspect dynamic-convolution models.",
        epilog=MAIN_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", formatter_class=_FMT, help="train a model from a YAML config",
        description="Train a model from a YAML config. The config is validated (unknown keys, wrong types, "
        "bad values and unknown model/dataset/loss names fail before training, naming the key path); the "
        "resolved config is saved as RUN_DIR/config.yaml. Ctrl-C (exit 130) or SIGTERM (exit 143) saves a "
        "checkpoint at the end of the current step, as any error in training does; --resume continues exactly "
        "where a run stopped. One run per directory: a second one into a RUN_DIR in use fails at once.",
        epilog="""\
examples:
  dynconv train configs/sr_switched_x2.yaml
  dynconv train configs/cifar10_resnet18_switched.yaml --set train.steps=500 --set optim.lr=0.05 --run-dir runs/c10
  dynconv train --resume runs/c10                       # continue (config from runs/c10/config.yaml)
  dynconv train configs/sr_plain_x2.yaml --resume runs/sr --set train.steps=4000   # continue, train longer
  accelerate launch --multi_gpu --num_processes 2 -m dynconv train configs/sr_switched_x2.yaml   # DDP, 2 GPUs
  torchrun --nproc_per_node 2 -m dynconv train configs/sr_switched_x2.yaml --set train.device=cpu  # DDP on CPU (gloo)
""")
    p.add_argument("config", nargs="?", type=Path, help="YAML config (optional with --resume: the run's config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable: --set train.batch_size=32")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--run-dir", type=Path, metavar="DIR", help="output directory (default: runs/<config name>)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after step N (saving a checkpoint) without changing the schedule's length")

    p = sub.add_parser(
        "eval", formatter_class=_FMT, help="evaluate a run or checkpoint",
        description="Evaluate on the config's eval split; print the metrics and write metrics.json into the "
        "run directory (or next to the checkpoint). A run directory uses its best checkpoint, else its latest.",
        epilog="""\
examples:
  dynconv eval runs/sr
  dynconv eval runs/sr --checkpoint runs/sr/checkpoints/step_00002000
  dynconv eval configs/sr_switched_x2.yaml --checkpoint runs/sr --set data.eval_options.patch_size=null
  dynconv eval runs/sr --eval-set Set14=../shared/data/sr/test/Set14 --eval-set mine=~/photos   # any folders
""")
    p.add_argument("source", type=Path, metavar="CONFIG_or_RUN_DIR")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (or a run directory: best, else latest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value")
    p.add_argument("--max-batches", type=int, metavar="N", help="evaluate on the first N batches only")
    p.add_argument("--eval-set", dest="eval_sets", action="append", default=[], metavar="NAME=FOLDER",
                   help="evaluate on this folder of images instead (SR: HR images of any size; grayscale/RGBA "
                   "converted to RGB) and write RUN/eval/NAME.json; repeatable")

    p = sub.add_parser(
        "convert", formatter_class=_FMT, help="convert a checkpoint's convs to switched / CondConv layers",
        description="Checkpoint surgery for staged training: load a checkpoint (and its run's config), "
        "replace the matching nn.Conv2d layers by SwitchedConv2d or CondConv2d layers computing the same "
        "function, check the outputs on a random input (prints the max difference) and write a new "
        "checkpoint directory that records the conversion, so loading it rebuilds the converted model. "
        "OUT must be new or empty and outside the source's run directory; nothing there is ever deleted "
        "(--overwrite replaces only a previous convert output, which carries a .dynconv-convert marker). "
        "Train on from it with `dynconv train CONFIG --set model.init=OUT`.",
        epilog="""\
examples:
  dynconv convert runs/sr_plain --to switched --include 'body.*' --breadth 8 --selector lambda -o runs/sr_plain_switched
  dynconv convert runs/c10/checkpoints/step_00010000 --to condconv --include 'layer*.conv2' --breadth 4 -o runs/c10_cond
  dynconv train configs/sr_plain_x2.yaml --set model.init=runs/sr_plain_switched --run-dir runs/stage2
""")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="checkpoint directory or run directory")
    p.add_argument("--to", required=True, choices=["switched", "condconv"])
    p.add_argument("--include", nargs="+", default=["*"], metavar="PATTERN",
                   help="module names or glob patterns of the convs to convert (default: every conv)")
    p.add_argument("--breadth", type=int, default=8, help="experts per layer (switched: breadth; condconv: num_experts)")
    p.add_argument("--selector", default="conv1x1",
                   help="switched selector: conv1x1 | lambda | lambda_then_conv1x1 (default conv1x1)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="another layer option (YAML value), e.g. --option routing=soft")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="output checkpoint directory: new or empty (never inside the source's run directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a previous `dynconv convert` output (nothing else is ever replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new layers' initialisation (default 0)")

    p = sub.add_parser(
        "viz", formatter_class=_FMT, help="selector maps and usage charts for a trained model",
        description="For every switched conv of a trained model: the expert each pixel uses on each image "
        "(beside the image) and the usage bar chart; routing statistics from training in routing.json.",
        epilog="""\
examples:
  dynconv viz runs/sr photo.png other.jpg -o runs/sr/maps
  dynconv viz runs/c10 cat.png -o maps --checkpoint runs/c10/checkpoints/step_00005000
""")
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    p.add_argument("--checkpoint", type=Path, help="a specific checkpoint (default: best, else latest)")

    p = sub.add_parser(
        "info", formatter_class=_FMT, help="params and FLOPs per output pixel of a model",
        description="Build the model of a config, run directory or checkpoint (recorded conversions applied, "
        "weights loaded) and print its parameters (every expert counted: all are stored) and FLOPs per "
        "output pixel (2 x multiply-adds of one forward / output pixels; switched and cond convs at their "
        "active cost: hard routing = one expert; see dynconv.models.flops). Pixels: SR -> HR output pixel, "
        "VQ-VAE -> reconstructed pixel, classifier -> input pixel. The input size defaults to the training "
        "crop (SR: the LR patch, data patch_size / scale), else the data's size, else 48 (SR) / 32 (CIFAR); "
        "CondConv's per-example routing cost is spread over those pixels.",
        epilog="""\
examples:
  dynconv info configs/sr_switched_x2.yaml
  dynconv info configs/cifar10_resnet18_condconv.yaml --by-layer
  dynconv info runs/sr --input-size 128 128 --json runs/sr/info.json   # best (else latest) checkpoint of a run
  dynconv info configs/sr_switched_x2.yaml --set model.options.layer.breadth=32
""")
    p.add_argument("source", type=Path, metavar="CONFIG_or_RUN_DIR_or_CHECKPOINT")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the model input's height and width (SR: the LR image); default: see above")
    p.add_argument("--by-layer", action="store_true", help="also print a per-layer table (own params, FLOPs/pixel, share)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers (with the per-layer ones) as JSON")

    p = sub.add_parser(
        "study", formatter_class=_FMT, help="run a study: variants x seeds x eval sets, with a results table",
        description="Run every variant x seed of a study file as an ordinary run directory (OUT/runs/<variant>/"
        "seed<k>), evaluate each on every eval set, and write OUT/study.json, OUT/results.md (mean ± std over "
        "seeds, paired differences to the baseline with 95%% intervals) and OUT/report.html. A finished run is "
        "skipped on a rerun; an interrupted one resumes exactly; a failed one is reported and the others go on. "
        "The study file is checked (every run's config included) before anything trains. See docs/studies.md.",
        epilog="""\
examples:
  dynconv study configs/studies/sr_x2.yaml --profile cpu --out ~/studies/sr
  dynconv study configs/studies/sr_x2.yaml --profile cpu --out ~/studies/sr --only staged --seeds 0,1,2
  dynconv study configs/studies/sr_x2.yaml --profile cpu --out ~/studies/sr --dry-run     # list the runs
  dynconv study configs/studies/sr_x2.yaml --profile cpu --out ~/studies/sr --report-only # rewrite the outputs
""")
    p.add_argument("study", type=Path, metavar="STUDY.yaml")
    p.add_argument("--profile", help="a profile of the study file (its settings apply to every variant)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: runs/studies/<name>-<profile>)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (plus the baseline and the runs they branch from)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="run only on these of the study's data sets (a study with top-level datasets)")
    p.add_argument("--seeds", metavar="0,1,2", help="seeds for every variant (replaces the study's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value in every run")
    p.add_argument("--dry-run", action="store_true", help="check the study and list its runs; train nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite study.json, results.md and report.html")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS", help="seconds between progress lines (default 30)")

    sub.add_parser("demo", help="the main job (options: dynconv demo --help)", add_help=False)
    return parser


# ------------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import Trainer, TrainingError
    from .train import checkpoint as ckpt
    from .train.lock import RunDirLock

    if args.config is None and args.resume is None:
        print("dynconv train: give a CONFIG (or --resume RUN_DIR)", file=sys.stderr)
        return EXIT_USAGE
    config_path = args.config if args.config is not None else args.resume / "config.yaml"
    config = load_config(config_path, args.overrides)
    if args.resume is not None:
        run_dir = args.resume
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(run_dir).resolve():
            print("dynconv train: --run-dir and --resume name different directories", file=sys.stderr)
            return EXIT_USAGE
    else:
        run_dir = args.run_dir or Path("runs") / Path(config_path).stem
    if os.environ.get("RANK", "0") in ("", "0"):  # other ranks' probes could race the main one's lock
        RunDirLock(run_dir).check()  # a run in progress: name it (exit 1) before anything else
    if args.resume is None:
        if ckpt.list_checkpoints(Path(run_dir) / "checkpoints"):
            print(f"dynconv train: {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
                  "or choose another --run-dir", file=sys.stderr)
            return EXIT_USAGE
    trainer = Trainer(config, run_dir, resume=args.resume is not None)
    if trainer.is_main:
        where = f"resuming {run_dir} at step {trainer.step}" if args.resume else f"training into {run_dir}"
        print(f"{where}: {config.model.name} on {config.data.name}, {trainer.total_steps} steps, "
              f"{trainer.world} process(es) on {trainer.device}", flush=True)
    try:
        result = trainer.fit(max_steps=args.max_steps)
    except TrainingError as error:
        print(f"dynconv train: {error}", file=sys.stderr)
        return EXIT_ERROR
    if result.interrupted:
        if trainer.is_main:
            by = f" by {result.signal}" if result.signal else ""
            print(f"interrupted{by} at step {result.step}; checkpoint {result.checkpoint}; "
                  f"continue with: dynconv train --resume {run_dir}", file=sys.stderr)
        return EXIT_TERMINATED if result.signal == "SIGTERM" else EXIT_INTERRUPTED
    if trainer.is_main:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        if trainer.resumed_from is not None and result.checkpoint == trainer.resumed_from:
            print(f"nothing to do: {run_dir} is already at step {result.step}/{result.total_steps} "
                  f"(checkpoint {result.checkpoint}); train longer with --set train.steps=N")
        else:
            print(f"done: step {result.step}/{result.total_steps}; {metrics or 'no eval'}; checkpoint {result.checkpoint}")
    return EXIT_OK


def _parse_eval_sets(items: list[str]) -> list[tuple[str, Path]]:
    sets = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--eval-set must look like NAME=FOLDER, got {item!r}")
        if any(name == other for other, _ in sets):
            raise ValueError(f"--eval-set: the name {name!r} is given twice")
        sets.append((name, Path(folder).expanduser()))
    return sets


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train.evaluation import eval_set_split, evaluate_eval_set, evaluate_run
    from .train.experiment import format_cost

    try:
        eval_sets = _parse_eval_sets(args.eval_sets)
    except ValueError as error:
        print(f"dynconv eval: {error}", file=sys.stderr)
        return EXIT_USAGE
    for name, folder in eval_sets:
        try:
            eval_set_split(folder)
        except FileNotFoundError as error:
            print(f"dynconv eval: --eval-set {name}={folder}: {error}", file=sys.stderr)
            return EXIT_USAGE
    if eval_sets and not Path(args.source).is_dir():
        print(f"dynconv eval: --eval-set needs a run or checkpoint directory, got {args.source}", file=sys.stderr)
        return EXIT_USAGE
    if eval_sets:
        results = [evaluate_eval_set(args.source, name, folder, args.checkpoint, overrides=args.overrides,
                                     max_batches=args.max_batches) for name, folder in eval_sets]
    else:
        results = [evaluate_run(args.source, args.checkpoint, overrides=args.overrides, max_batches=args.max_batches)]
    for result in results:
        print(f"{result['model']} on {result.get('eval_set', result['dataset'])} ({result['split']}), checkpoint "
              f"{result['checkpoint']} (step {result['step']}, {result['weights']}):")
        for name, value in result["metrics"].items():
            print(f"  {name:<10} {value:.4f}")
        print(f"  model: {format_cost(result)}")
        if "written" in result:
            print(f"wrote {result['written']}")
    return EXIT_OK


def _cmd_study(args: argparse.Namespace) -> int:
    from .studies import StudyRunner, load_study, parse_seeds, write_outputs
    from .studies.results import markdown_table, results_table

    seeds = parse_seeds(args.seeds) if args.seeds else None
    plan = load_study(args.study, profile=args.profile, out=args.out, only=args.only or None, datasets=args.datasets,
                      seeds=seeds, overrides=args.overrides)
    print(f"study {plan.name}" + (f" (profile {plan.profile})" if plan.profile else "") + f": {len(plan.runs)} runs "
          f"({len(plan.variants)} variants) into {plan.out}; eval sets {', '.join(plan.eval_sets) or 'none'}")
    if args.dry_run:
        from .studies.runner import planned_steps

        for run in plan.runs:
            branch = f", branch of {run.branch_from.variant} at step {run.branch_from.step}" if run.branch_from else ""
            print(f"  {run.key}: {run.config['model']['name']}, {planned_steps(run)}, config {run.config_hash}{branch}")
        return EXIT_OK
    if not args.report_only:
        outcome = StudyRunner(plan, progress_every=args.progress_every).run()
    written = write_outputs(plan)
    import json as _json

    data = _json.loads((plan.out / "study.json").read_text())
    for set_name in plan.eval_sets:
        print(f"{set_name}:\n" + markdown_table(results_table(plan, data, set_name)))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    if args.report_only:
        return EXIT_OK
    if outcome.interrupted:
        print(f"interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed: " + "; ".join(f"{o.key}: {o.message}" for o in outcome.failed),
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


class UsageError(Exception):
    """A command-line argument is wrong: main() prints the message and exits with status 2."""


def _parse_options(items: list[str]) -> dict:
    from .config import ConfigError, parse_yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option must look like key=value, got {item!r}")
        try:
            options[key] = parse_yaml(value, key)
        except ConfigError as error:
            raise UsageError(f"--option {error}") from None
    return options


def _check_convert_options(args: argparse.Namespace) -> None:
    """--breadth, --selector and --option checked before any work, naming the flag, the
    value and what is accepted."""
    from .config import ConvertConfig
    from .convert import LayerOptionError, check_layer_kwargs

    cfg = ConvertConfig(step=0, to=args.to, breadth=args.breadth, selector=args.selector,
                        options=_parse_options(args.options))
    try:
        check_layer_kwargs(args.to, cfg.layer_kwargs())
    except LayerOptionError as error:
        flag = {"breadth": "--breadth", "num_experts": "--breadth", "selector": "--selector"}.get(error.key)
        raise UsageError(f"{flag or f'--option {error.key}'}: {error}") from None


def _check_image_files(paths: list[Path]) -> None:
    """Every IMAGE argument must be a file Pillow can decode (before the model is loaded)."""
    from PIL import Image

    for path in paths:
        if path.is_dir():
            raise UsageError(f"IMAGE {path} is a directory; expected an image file (PNG, JPEG, ...)")
        if not path.is_file():
            raise UsageError(f"IMAGE {path} does not exist")
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise UsageError(f"IMAGE {path} is not an image file Pillow can read ({error}); "
                             f"expected PNG, JPEG, BMP, TIFF, WebP, ...") from None


def example_input(model, config, task: str):
    """A random input of a size the model accepts."""
    import torch

    g = torch.Generator().manual_seed(0)
    if task == "super_resolution":
        return torch.rand(2, 3, 12, 12, generator=g)
    if task == "reconstruction":
        channels = config.model.options.get("in_channels", 3)
        return torch.rand(2, channels, 16, 16, generator=g)
    channels = config.model.options.get("in_channels", 3)
    return torch.randn(2, channels, 32, 32, generator=g)


def _outputs(model, x):
    out = model(x)
    if isinstance(out, dict):
        out = out.get("reconstruction", next(iter(out.values())))
    return out


def _check_convert_out(out: Path, sources: list[Path], *, overwrite: bool) -> None:
    """Refuse an ``-o`` equal to or inside the source checkpoint or its run directory, or one
    that holds anything but a previous convert output (see ``checkpoint.check_output_dir``)."""
    from .train import checkpoint as ckpt

    target = out.resolve()
    protected = set()
    for source in sources:
        source = source.resolve()
        protected.add(source)
        if source.parent.name == "checkpoints":  # RUN/checkpoints/step_N: protect RUN too
            protected.add(source.parent.parent)
    for root in sorted(protected):
        if target == root or root in target.parents:
            raise ckpt.CheckpointError(f"-o {out} is {'the' if target == root else 'inside the'} source {root}; "
                                       "convert never writes into its source: choose another output directory")
        if target in root.parents:
            raise ckpt.CheckpointError(f"-o {out} contains the source {root}; choose another output directory")
    ckpt.check_output_dir(out, overwrite=overwrite)


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from .config import ConvertConfig
    from .models import model_task
    from .train import checkpoint as ckpt
    from .train.experiment import apply_conversion, conversion_record, load_checkpoint_model

    _check_convert_options(args)
    source = ckpt.resolve_checkpoint(args.checkpoint)
    try:  # before any work: never write into the source, nor over anything convert did not write
        _check_convert_out(Path(args.out), [Path(args.checkpoint), source], overwrite=args.overwrite)
    except ckpt.CheckpointError as error:
        print(f"dynconv convert: {error}", file=sys.stderr)
        return EXIT_USAGE
    model, config, meta = load_checkpoint_model(source)
    task = model_task(config.model.name)
    cfg = ConvertConfig(step=0, to=args.to, include=list(args.include), breadth=args.breadth, selector=args.selector,
                        options=_parse_options(args.options))
    cfg.validate("convert")
    model.eval()
    reference = copy.deepcopy(model)
    torch.manual_seed(args.seed)
    record = conversion_record(cfg, None)
    record["converted"] = apply_conversion(model, {**record, "converted": None})
    if not record["converted"]:
        print(f"dynconv convert: no nn.Conv2d of {config.model.name} matches {args.include}; names: "
              f"{[n for n, m in reference.named_modules() if type(m) is torch.nn.Conv2d][:20]}", file=sys.stderr)
        return EXIT_ERROR
    model.eval()
    x = example_input(model, config, task)
    with torch.no_grad():
        diff = (_outputs(model, x).float() - _outputs(reference, x).float()).abs().max().item()
    conversions = list(meta.get("conversions", [])) + [record]
    out_meta = {"step": meta.get("step"), "conversions": conversions, "source": str(source),
                "model": config.model.name, "task": task, "max_output_difference": diff}
    try:
        ckpt.save_weights_checkpoint(args.out, model_state=model.state_dict(), meta=out_meta,
                                     config_yaml=yaml.safe_dump(config.to_dict(), sort_keys=False),
                                     overwrite=args.overwrite)
    except ckpt.CheckpointError as error:
        print(f"dynconv convert: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"converted {len(record['converted'])} conv(s) of {config.model.name} to {args.to} "
          f"(breadth {args.breadth}): {', '.join(record['converted'])}")
    print(f"max |output difference| on a random input: {diff:.3g}")
    print(f"wrote {args.out}; train on with: dynconv train CONFIG --set model.init={args.out}")
    tolerance = 1e-4 * max(1.0, _outputs(reference, x).abs().max().item())
    if diff > tolerance:
        print(f"dynconv convert: warning: outputs differ by {diff:.3g} (> {tolerance:.1g})", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def load_image(path: Path):
    """An image file as float32 (3, H, W) in [0, 1] (16-bit images at full precision)."""
    import torch
    from PIL import Image

    from .data.images import rgb_float

    with Image.open(path) as img:
        array = rgb_float(img)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _cmd_viz(args: argparse.Namespace) -> int:
    import torch

    from .insight import switched_layers
    from .models import model_task
    from .train import checkpoint as ckpt
    from .train.experiment import input_normalisation, load_checkpoint_model
    from .viz import save_selector_maps

    _check_image_files(args.images)
    source = ckpt.resolve_checkpoint(args.checkpoint or args.run)
    model, config, meta = load_checkpoint_model(source)
    model.eval()
    if not switched_layers(model):
        print(f"dynconv viz: {config.model.name} has no switched convs; nothing to draw", file=sys.stderr)
        return EXIT_ERROR
    task = model_task(config.model.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    mean, std = input_normalisation(config)
    for path in args.images:
        image = load_image(path)
        if mean is not None:  # as the model saw its training images
            image = (image - mean) / std
        if task == "reconstruction":
            h, w = image.shape[1:]
            image = image[:, : h - h % 4, : w - w % 4]
        written += save_selector_maps(model, image[None], out / Path(path).stem)
    # the usage counters are not part of the weights: report what the checkpoint recorded
    # when it was saved (Trainer.save), never the freshly built model's defaults
    recorded = meta.get("routing")
    report: dict[str, Any] = {"checkpoint": str(source), "step": meta.get("step")}
    if isinstance(recorded, dict) and isinstance(recorded.get("layers"), dict):
        report.update(recorded=True, recorded_at_step=recorded.get("step"), layers=recorded["layers"])
        said = f"routing statistics recorded at step {recorded.get('step')}"
    else:
        note = ("this checkpoint records no routing statistics (it was written by dynconv convert, whose new "
                "layers have not been trained, or by an older dynconv): expert usage and entropy during training "
                "are unknown; the PNGs show the routing on the given images only")
        report.update(recorded=False, note=note, layers={})
        said = "no routing statistics recorded in this checkpoint"
    (out / "routing.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {len(written)} PNGs and routing.json to {out} (checkpoint {source}; {said})")
    return EXIT_OK


def _info_model(source: Path, overrides: list[str]) -> tuple[Any, Any, Path | None, dict[str, Any]]:
    """``(model, config, checkpoint or None, meta)``: a YAML config builds a fresh model; a run
    or checkpoint directory rebuilds its checkpoint's model like eval/convert (a run directory
    without a checkpoint yet falls back to its config.yaml)."""
    from .config import config_from_dict, load_config
    from .train import checkpoint as ckpt
    from .train.experiment import build_experiment_model, check_config, config_of_checkpoint, load_checkpoint_model

    if source.is_file() and source.name not in (ckpt.MODEL_FILE, ckpt.META_FILE, ckpt.STATE_FILE, ckpt.EMA_FILE):
        config = load_config(source, overrides)
        check_config(config, training=False)
        return build_experiment_model(config), config, None, {}
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (expected a YAML config, a run directory or a checkpoint directory)")
    has_config = source.is_dir() and (source / "config.yaml").is_file()
    try:
        checkpoint = ckpt.resolve_checkpoint(source)
    except ckpt.CheckpointError:
        # only a run without any checkpoint yet falls back to its config; a damaged one is reported
        has_checkpoints = any((source / name).exists() for name in (ckpt.META_FILE, ckpt.MODEL_FILE)) or any(
            (source / "checkpoints").glob("step_*"))
        if not has_config or has_checkpoints:
            raise
        config = load_config(source, overrides)
        check_config(config, training=False)
        return build_experiment_model(config), config, None, {}
    config = config_of_checkpoint(source if has_config else checkpoint)
    if overrides:
        config = config_from_dict(config.to_dict(), overrides)
    check_config(config, training=False)
    model, config, meta = load_checkpoint_model(checkpoint, config)
    return model, config, checkpoint, meta


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _flops(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import model_task
    from .train.experiment import apply_conversion, conversion_record, format_cost, model_cost

    if args.input_size is not None and min(args.input_size) < 1:
        print(f"dynconv info: --input-size expects two positive integers H W, got {args.input_size}", file=sys.stderr)
        return EXIT_USAGE
    model, config, checkpoint, meta = _info_model(Path(args.source), args.overrides)
    try:
        cost = model_cost(model, config, args.input_size, by_layer=True)
    except (RuntimeError, ValueError) as error:
        size = args.input_size or "the default size"
        print(f"dynconv info: {config.model.name} cannot run on an input of {size} (try another --input-size H W): "
              f"{error}", file=sys.stderr)
        return EXIT_USAGE
    task = model_task(config.model.name)
    conversions = meta.get("conversions", [])
    print(f"{config.model.name} ({task}) from {args.source}")
    if checkpoint is not None:
        print(f"  checkpoint   {checkpoint} (step {meta.get('step')}; {len(conversions)} conversion(s) applied)")
    print(f"  params       {cost['params']:,} ({_si(cost['params'])}; every expert counted: all are stored)")
    print(f"  FLOPs/pixel  {cost['flops_per_pixel']:,.0f} ({_si(cost['flops_per_pixel'])}) per {cost['flops_per']}; "
          "2 x multiply-adds, switched/cond convs at their active cost")
    print(f"  input        {'x'.join(map(str, cost['input_size']))} (C x H x W; {cost['input_size_from']})")
    staged = config.convert is not None and not any(r.get("step") is not None for r in conversions)
    if staged:  # the config converts during training: quote the model it becomes too
        converted = copy.deepcopy(model)
        apply_conversion(converted, {**conversion_record(config.convert), "converted": None})
        after = model_cost(converted, config, args.input_size)
        print(f"  after convert at step {config.convert.step}: {format_cost(after)}")
    if args.by_layer:
        layers = cost["by_layer"]
        width = max([len("layer"), *(len(n) for n in layers)])
        kinds = max([len("type"), *(len(v["type"]) for v in layers.values())])
        total = sum(v["flops_per_pixel"] for v in layers.values()) or 1.0
        print(f"\n  {'layer':<{width}}  {'type':<{kinds}}  {'own params':>12}  {'FLOPs/pixel':>14}  {'share':>6}")
        for name, v in layers.items():
            print(f"  {name or '(model)':<{width}}  {v['type']:<{kinds}}  {v['params']:>12,}  "
                  f"{_flops(v['flops_per_pixel']):>14}  {100 * v['flops_per_pixel'] / total:>5.1f}%")
    if args.json is not None:
        record = {"source": str(args.source), "model": config.model.name, "task": task,
                  "checkpoint": str(checkpoint) if checkpoint is not None else None, "step": meta.get("step"),
                  "conversions": len(conversions), **cost}
        if staged:
            record["after_convert"] = {"step": config.convert.step, **after}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return EXIT_OK


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dynconv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from . import demo

        demo.main(argv[1:])
        return EXIT_OK
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .config import ConfigError
    from .data.registry import DatasetError
    from .train.checkpoint import CheckpointError
    from .train.lock import RunDirLockedError

    handlers = {"train": _cmd_train, "eval": _cmd_eval, "convert": _cmd_convert, "viz": _cmd_viz, "study": _cmd_study,
                "info": _cmd_info}
    try:
        return handlers[args.command](args)
    except ConfigError as error:
        print(f"dynconv {args.command}: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as error:
        print(f"dynconv {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, DatasetError, RunDirLockedError, FileNotFoundError) as error:
        print(f"dynconv {args.command}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:
        if error.errno not in _STORAGE_ERRORS:
            raise
        # a read-only, full or forbidden output directory: one line naming the file, not a traceback
        where = f" {error.filename}" if error.filename else ""
        print(f"dynconv {args.command}: cannot write{where}: {error.strerror or error}", file=sys.stderr)
        return EXIT_ERROR


_STORAGE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


if __name__ == "__main__":
    sys.exit(main())
