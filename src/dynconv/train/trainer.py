"""The training loop: ``Trainer(config, run_dir).fit()``.

:meth:`Trainer.fit` is a loop over :meth:`Trainer._train_step` (forward and backward over the
micro-batches, one collective, the non-finite check, the weight update, the EMA) and
:meth:`Trainer._after_step` (logging, evaluation, checkpoints, stopping). What it trains is
built by :mod:`.experiment`, the batch order comes from :mod:`.loaders`, what differs between
tasks from :mod:`.tasks`. See ``docs/training.md`` for the run directory and the guarantees
(exact resume, Ctrl-C / SIGTERM and error saves, one run per directory).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from ..config import Config, ConfigError, save_config
from . import checkpoint as ckpt
from .ema import EMA
from .experiment import (
    apply_conversion,
    build_experiment_model,
    build_loss_terms,
    build_optimizer,
    build_split,
    carry_optimizer_state,
    check_config,
    check_split_images,
    combine_loss_terms,
    conversion_record,
    format_cost,
    load_model_weights,
    make_accelerator,
    model_cost,
    to_channels_last,
)
from .grad_checkpoint import enable_block_checkpointing
from .loaders import eval_loader, to_device, train_loader
from .lock import RunDirLock
from .logging import RunLogger, count_records_after, record_run_start
from .plateau import PlateauRule
from .schedule import annealed_state, check_anneal_targets, set_annealed, set_lr
from .signals import StopSignals
from .tasks import METRICS, TASKS, eval_set_metric, per_example_metric


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
    stopped: dict[str, Any] | None = None  # why it ended before total_steps (train.stop_on_plateau)


class StepOutcome(NamedTuple):
    """What one training step reports to the after-step."""

    loss: float  # mean over micro-batches and ranks
    terms: dict[str, float]  # each loss term, mean over micro-batches (this rank)
    lr: float
    stop_requested: bool  # some rank got a stop signal (the step's collective)
    seconds: float = 0.0  # the step's wall-clock: data, conversion, forward, backward, update (no eval, saving, logging)


class _LossWindow:
    """Mean loss, loss terms, throughput and the mean seconds of a training step alone
    (``step_seconds``: without evaluation, saving or logging) between two ``train`` log records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.terms, self.steps, self.start = 0.0, {}, 0, time.perf_counter()
        self.step_seconds = 0.0

    def add(self, step: StepOutcome) -> None:
        self.loss += step.loss
        self.steps += 1
        self.step_seconds += step.seconds
        for k, v in step.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v

    def record(self, lr: float, global_batch: int, epoch: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        return {"loss": self.loss / self.steps, "lr": lr,
                "samples_per_s": self.steps * global_batch / max(elapsed, 1e-9), "epoch": epoch,
                "step_seconds": self.step_seconds / self.steps,
                **{f"loss/{k}": v / self.steps for k, v in self.terms.items()}}


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
        self.task_spec = TASKS[self.task]
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
        self._stop = StopSignals()
        # (epoch, batch_in_epoch) where the next step's data starts: saved with a checkpoint of self.step
        self._position = (0, 0)
        self._step_rng: dict[str, Any] | None = None
        self._step_buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._mid_step = False  # between the step's snapshot and its end: see _snapshot_step_start
        self._in_update = False
        self._last_saved_step: int | None = None
        self.logger = RunLogger(self.run_dir, enabled=False, tensorboard=False, progress=False, total_steps=0)
        self.conversion_checks: list[dict[str, float]] = []
        self.annealed: dict[str, float] = {}  # the annealed attributes of the last step (config.anneal)

        from accelerate.utils import set_seed

        set_seed(config.train.seed)
        self.skipped_checkpoints: list[tuple[Path, str]] = []  # damaged newer checkpoints resume passed over
        resume_from = self._resume_checkpoint() if resume else None
        self._build_model(resume_from, checkpoint)
        self.loss_terms = build_loss_terms(config, self.device)
        self.metric_names = list(config.eval.metrics) or list(self.task_spec.metrics)
        self.best_metric = config.eval.best_metric or self.metric_names[0]
        self.best_mode = config.eval.best_mode if config.eval.best_metric else METRICS[self.best_metric][1]
        rule = config.train.stop_on_plateau
        self.plateau = PlateauRule(rule, METRICS[rule.metric][1]) if rule is not None else None
        self.eval_dataset = build_split(config, config.data.eval_split, config.data.eval_options)
        check_split_images(self.task, "eval", self.eval_dataset, self.metric_names)
        if mode == "eval":
            self.ema = None
            return
        # -- data
        self.train_dataset = build_split(config, config.data.train_split, config.data.train_options)
        check_split_images(self.task, "train", self.train_dataset, self.metric_names)
        self.train_loader = train_loader(config, self.train_dataset, self.device, self.rank, self.world)
        self.batches_per_epoch = len(self.train_loader)
        if self.batches_per_epoch == 0:
            raise ConfigError("train.batch_size", f"the training set ({len(self.train_dataset)} items over {self.world} process(es)) "
                              f"holds no full batch of {config.train.batch_size}")
        self.steps_per_epoch = steps_per_epoch = max(self.batches_per_epoch // config.train.accumulate, 1)
        self.total_steps = config.train.steps if config.train.steps is not None else config.train.epochs * steps_per_epoch
        check_anneal_targets(self.raw, config.anneal, conversion_pending=config.convert is not None)
        # -- optimizer, EMA
        self.optimizer = build_optimizer(config, self.raw, self.conversions)
        self.ema = EMA(self.raw, config.train.ema) if config.train.ema is not None else None
        if resume_from is not None:
            self._load_resume_state(resume_from)
        self._prepare()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
            ckpt.remove_stale_temporaries(self.ckpt_dir)
        self.resumed_from = resume_from

    def _resume_checkpoint(self) -> Path:
        """The newest intact checkpoint of the run (damaged newer ones are reported and kept
        in ``skipped_checkpoints``)."""
        resume_from, self.skipped_checkpoints = ckpt.newest_intact_checkpoint(self.ckpt_dir)
        if resume_from is None:
            why = "".join(f"; skipped {p.name}: {reason}" for p, reason in self.skipped_checkpoints)
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {self.ckpt_dir}{why}")
        if self.is_main:
            for path, reason in self.skipped_checkpoints:
                print(f"dynconv: resume skips the damaged checkpoint {path.name}: {reason}; resuming from "
                      f"{resume_from.name}", file=sys.stderr, flush=True)
        return resume_from

    def _build_model(self, resume_from: Path | None, checkpoint: str | Path | None) -> None:
        """``self.raw`` on the device, with the conversions of the checkpoint it continues
        (resume, an evaluated checkpoint, ``model.init``) applied first, so the architecture
        matches the weights; ``model.init``'s weights loaded."""
        init_weights = None
        if resume_from is not None:
            self.conversions = list(ckpt.read_meta(resume_from).get("conversions", []))
        elif checkpoint is not None:
            self.conversions = list(ckpt.read_meta(ckpt.resolve_checkpoint(checkpoint)).get("conversions", []))
        elif self.config.model.init is not None:
            init = ckpt.resolve_checkpoint(self.config.model.init)
            self.conversions = list(ckpt.read_meta(init).get("conversions", []))
            init_weights = (init, ckpt.load_weights(init / ckpt.MODEL_FILE))
        else:
            self.conversions = []
        self.raw = build_experiment_model(self.config, self.conversions)
        if init_weights is not None:
            load_model_weights(self.raw, init_weights[1], str(init_weights[0]))
        self.raw.to(self.device)
        if self.config.train.channels_last:
            to_channels_last(self.raw)

    def _prepare(self) -> None:
        cfg = self.config
        if cfg.train.checkpointing:
            if enable_block_checkpointing(self.raw) == 0:
                warnings.warn(f"train.checkpointing: model {cfg.model.name!r} defines no checkpoint_blocks(); nothing is checkpointed")
        module = torch.compile(self.raw) if cfg.train.compile else self.raw
        self.model, self.optimizer = self.accelerator.prepare(module, self.optimizer)

    # -- the training loop -----------------------------------------------------------------------
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
        stop_at = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        self._begin()
        stream = self._micro_batches()
        # a resumed run that has nothing left to do reports the checkpoint it resumed from
        result = FitResult(step=self.step, total_steps=self.total_steps, checkpoint=self.resumed_from)
        self._window = _LossWindow()
        self._position = (self.epoch, self.batch_in_epoch)
        self._mid_step = False
        try:
            with self._stop.watching(self.logger.write):
                while self.step < stop_at and not self._stopped_on_plateau():
                    started = time.perf_counter()
                    batch = next(stream)
                    self._convert_if_due(batch)
                    outcome = self._train_step(batch, stream)._replace(seconds=time.perf_counter() - started)
                    if self._after_step(outcome, result, stop_at):
                        break
        except KeyboardInterrupt:
            self._save_after_second_signal(result)
        except TrainingError:
            raise
        except Exception as error:
            self._save_after_error(error)
            raise
        finally:
            self.logger.close()
        return self._finish(result)

    def _train_step(self, batch: dict, stream: Iterator[dict]) -> StepOutcome:
        """One optimizer step on ``batch`` and ``train.accumulate - 1`` more micro-batches of
        ``stream``: forward and backward, one collective (the mean loss and every rank's stop
        request), the non-finite check, the weight update and the EMA."""
        cfg, acc = self.config, self.accelerator
        self._snapshot_step_start()
        lr = set_lr(self._optimizer(), cfg.schedule, self.step, self.total_steps)
        if cfg.anneal:
            self.annealed = set_annealed(self.raw, cfg.anneal, self.step, self.steps_per_epoch)
            if self.ema is not None:  # the EMA copy is the model evaluation runs
                set_annealed(self.ema.module, cfg.anneal, self.step, self.steps_per_epoch)
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
        flags = torch.stack([loss_sum / cfg.train.accumulate, torch.tensor(float(self._stop.requested), device=self.device)])
        flags = acc.reduce(flags, "sum") if self.world > 1 else flags
        mean_loss = float(flags[0]) / self.world
        if not math.isfinite(mean_loss):
            self._stop_nonfinite(mean_loss)
        if cfg.optim.grad_clip is not None:
            acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self._in_update = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.raw)
        self._position = (self.epoch, self.batch_in_epoch)
        self._in_update = self._mid_step = False
        terms = {k: float(v) / cfg.train.accumulate for k, v in term_sums.items()}
        return StepOutcome(mean_loss, terms, lr, float(flags[1]) > 0)

    def _after_step(self, step: StepOutcome, result: FitResult, stop_at: int) -> bool:
        """Log, evaluate (tracking the best checkpoint) and save as the config asks; on a stop
        request save and return True (the loop ends)."""
        cfg, log = self.config, self.logger
        self._window.add(step)
        log.progress(1, loss=step.loss, lr=step.lr)
        interrupted = step.stop_requested or (self.world == 1 and self._stop.requested)
        if self.step % cfg.log.every == 0 or self.step == stop_at:
            self._log_train(step.lr)
        if cfg.log.images_every and self.step % cfg.log.images_every == 0:
            self._log_images()
        improved = plateau = False
        if self.step % cfg.eval.every == 0 or self.step == self.total_steps:
            improved = self._evaluate_and_track()
            plateau = self.plateau is not None and self.plateau.update(self.step, self.last_metrics.get(self.plateau.config.metric, math.nan))
        if self.step % cfg.log.checkpoint_every == 0 or improved or self.step == stop_at or interrupted or plateau:
            result.checkpoint = self.save(reason="interrupt" if interrupted else "plateau" if plateau else "periodic")
            if improved and self.is_main:
                ckpt.write_best(self.ckpt_dir, result.checkpoint, self.best_metric, self.best["value"], self.step)
                ckpt.prune_checkpoints(self.ckpt_dir, cfg.log.keep_last)
        if plateau:
            log.event("plateau", self.step, checkpoint=str(result.checkpoint),
                      **{k: v for k, v in self.plateau.stopped.items() if k != "step"})
            log.write(self.plateau.describe_stop())
        if not interrupted:
            return plateau
        result.interrupted = True
        result.signal = self._stop.name
        log.event("interrupt", self.step, checkpoint=str(result.checkpoint), signal=self._stop.name)
        log.write(f"interrupted: saved {result.checkpoint} at step {self.step}; resume with --resume {self.run_dir}")
        return True

    # -- around the loop ---------------------------------------------------------------------------
    def _begin(self) -> None:
        """Open the log, record the start (or the resume, marking what a killed run logged after
        its checkpoint as superseded), and put the resumed loss scaler back."""
        cfg = self.config
        self.logger = log = RunLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                                      progress=cfg.log.progress, total_steps=self.total_steps, initial_step=self.step)
        cost = self._log_model_cost("model")
        skipped = {split: n for split, ds in (("train", self.train_dataset), ("eval", self.eval_dataset))
                   if (n := int(getattr(ds, "skipped", 0) or 0))}
        extra = {"skipped_files": skipped} if skipped else {}
        if self.is_main:
            record_run_start(self.run_dir, "resume" if self.resumed_from is not None else "start", self.step)
        if self.resumed_from is None:
            log.event("start", self.step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                      world_size=self.world, device=str(self.device), precision=cfg.train.precision,
                      config=cfg.to_dict(), **extra, **cost)
        else:
            for path, reason in getattr(self, "skipped_checkpoints", []):
                log.event("skipped_checkpoint", self.step, checkpoint=str(path), reason=reason)
            # records that a killed run wrote after this checkpoint are superseded: read_log
            # drops the earlier records with step > discarded_after
            superseded = count_records_after(self.run_dir / "log.jsonl", self.step) if self.is_main else 0
            log.event("resume", self.step, checkpoint=str(self.resumed_from), world_size=self.world,
                      steps_per_epoch=self.steps_per_epoch, device=str(self.device), discarded_after=self.step,
                      superseded=superseded, **extra, **cost)
        if getattr(self, "_resume_scaler", None) and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(self._resume_scaler)

    def _finish(self, result: FitResult) -> FitResult:
        result.step = self.step
        result.metrics = dict(self.last_metrics)
        result.best = self.best
        result.stopped = self.plateau.stopped if self.plateau is not None else None
        finished = self.step == self.total_steps or (result.stopped is not None and self.step == result.stopped["step"])
        if self.is_main and self.last_metrics and finished:
            ckpt.atomic_write_text(self.run_dir / "metrics.json", json.dumps(
                {"step": self.step, "metrics": self.last_metrics, "best": self.best,
                 **({"stopped": result.stopped} if result.stopped else {})}, indent=2))
        return result

    def _stopped_on_plateau(self) -> bool:
        """``train.stop_on_plateau`` ended this run (now, or before the checkpoint it resumed)."""
        return self.plateau is not None and self.plateau.stopped is not None

    def _convert_if_due(self, batch: dict) -> None:
        """Staged conversion: convert at ``convert.step`` (once; the batch checks the loss)."""
        cfg = self.config.convert
        if cfg is not None and self.step >= cfg.step and not self._converted_at_config():
            self._in_update = True  # a half-converted model is not a state to save
            self.convert_now(batch)
            self._in_update = False

    def _stop_nonfinite(self, loss: float) -> None:
        """A NaN/inf loss: save the last good step, then raise :class:`TrainingError`."""
        self._optimizer().zero_grad(set_to_none=True)
        path = self.save(self._position, reason="nonfinite")
        self.logger.event("nonfinite", self.step + 1, loss=loss, checkpoint=str(path))
        raise TrainingError(
            f"non-finite loss ({loss}) at step {self.step + 1}; stopped. The last good state "
            f"(step {self.step}) is saved in {path}. Lower optim.lr, enable optim.grad_clip or use "
            "train.precision fp32, then resume with --resume."
        )

    def _save_after_second_signal(self, result: FitResult) -> None:
        """A second Ctrl-C (or one outside the main thread): save the state of the last
        completed step (with the data position of that step), unless the weights were being
        updated when it came."""
        log = self.logger
        self._optimizer().zero_grad(set_to_none=True)
        result.interrupted = True
        result.signal = self._stop.name
        if self._in_update:
            log.write(f"interrupted during the weight update of step {self.step + 1}: no checkpoint written; "
                      f"resume from the last one in {self.ckpt_dir}")
            return
        rng = self._restore_step_start()
        result.checkpoint = self.save(self._position, gather_rng=False, reason="interrupt", rng=rng)
        log.event("interrupt", self.step, checkpoint=str(result.checkpoint), signal=self._stop.name)
        log.write(f"interrupted: saved {result.checkpoint} at step {self.step}; resume with --resume {self.run_dir}")

    def _save_after_error(self, error: BaseException) -> None:
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
                path = self.save(self._position, gather_rng=False, reason="error", rng=self._restore_step_start())
            except Exception as save_error:  # e.g. the disk is full: report the first error
                log.write(f"error at step {self.step + 1} ({what}); writing a checkpoint failed too: {save_error}")
                return
        log.event("error", self.step, error=what, checkpoint=str(path))
        log.write(f"error at step {self.step + 1} ({what}): the last completed step ({self.step}) is saved in {path}; "
                  f"fix the cause, then continue with --resume {self.run_dir}")

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

    # -- forward / loss / data ---------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> dict:
        return self.task_spec.wrap(model(batch[self.task_spec.input]))

    def loss(self, outputs: dict, batch: dict, model: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the loss terms and each (unweighted) term
        (:func:`combine_loss_terms`); ``model`` defaults to the training model."""
        return combine_loss_terms(self.loss_terms, outputs, batch, model if model is not None else self.model, self.step)

    def _micro_batches(self) -> Iterator[dict]:
        while True:
            self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.train_loader:
                self.batch_in_epoch += 1
                yield to_device(batch, self.device, self.config.train.channels_last)
            self.epoch += 1
            self.batch_in_epoch = 0

    # -- state -------------------------------------------------------------------------------------
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
            "plateau": json.dumps(self.plateau.state_dict()) if self.plateau is not None else None,
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
                    "routing": {"step": self.step, "layers": self._routing_stats()},
                    "annealed": annealed_state(self.raw, self.config.anneal)}
            if self._stopped_on_plateau():  # the run's last checkpoint: why it ended before total_steps
                meta["stopped"] = self.plateau.stopped
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
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(json.loads(state["plateau"]))
        self._last_saved_step = self.step

    # -- staged conversion -------------------------------------------------------------------------
    def convert_now(self, batch: dict | None = None) -> dict[str, float]:
        """Convert the model per ``config.convert`` at the current step: rebuild the optimizer
        (old parameters keep their state; new ones start fresh, or the experts with their
        kernel's state under ``convert.optimizer_state: copy``), the EMA and the DDP wrapper.
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
        self.optimizer = build_optimizer(self.config, self.raw, self.conversions)
        carry_optimizer_state(old_opt, old_params, self.optimizer, self.raw,
                              copy_into_experts=cfg.optimizer_state == "copy")
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

    def _converted_at_config(self) -> bool:
        return any(r.get("step") is not None for r in self.conversions)

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

    # -- evaluation --------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if getattr(self, "ema", None) is not None else self.raw

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Metrics over the eval split (sharded across ranks, reduced): means per example, and
        eval-set metrics (:class:`~dynconv.train.tasks.EvalSetMetric`) from their summed statistic."""
        cfg = self.config
        model = self.eval_model()
        was = model.training
        model.eval()
        max_batches = cfg.eval.max_batches if max_batches is None else max_batches
        names = self.metric_names
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        set_metrics = {name: m for name in names if (m := eval_set_metric(name)) is not None}
        totals: dict[str, torch.Tensor] = {}
        try:
            for i, batch in enumerate(eval_loader(cfg, self.eval_dataset, self.rank, self.world)):
                if max_batches is not None and i >= max_batches:
                    break
                batch = to_device(batch, self.device, cfg.train.channels_last)
                with self.accelerator.autocast():
                    outputs = self.forward(model, batch)
                n = batch[self.task_spec.input].shape[0]
                for j, name in enumerate(names):
                    if name == "loss":
                        loss, _ = self.loss(outputs, batch, model=model)
                        sums[j] += float(loss) * n
                    elif name in set_metrics:
                        statistic = set_metrics[name].statistic(self.task_spec, outputs, batch)
                        totals[name] = totals[name] + statistic if name in totals else statistic
                    else:
                        sums[j] += per_example_metric(name, self.task_spec, outputs, batch).sum().cpu()
                sums[-1] += n
        finally:
            model.train(was)
        if self.world > 1:
            sums = self.accelerator.reduce(sums.to(self.device), "sum").cpu()
            totals = {k: self.accelerator.reduce(v.to(self.device), "sum").cpu() for k, v in totals.items()}
        count = max(float(sums[-1]), 1.0)
        results = {name: float(sums[j]) / count for j, name in enumerate(names)}
        for name, metric in set_metrics.items():
            results[name] = metric.finish(totals[name]) if name in totals else float("nan")
        return results

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

    # -- logging -----------------------------------------------------------------------------------
    def _log_train(self, lr: float) -> None:
        """The ``train`` record of the steps since the last one, and the routing statistics."""
        cfg, log = self.config, self.logger
        record = {**self._window.record(lr, cfg.train.batch_size * cfg.train.accumulate * self.world, self.epoch),
                  **self.annealed}
        if self.device.type == "cuda":  # the process's peak of allocated tensors so far (training and evaluation)
            record["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        log.event("train", self.step, **record)
        log.scalars(self.step, {"train/loss": record["loss"], "train/lr": lr,
                                "train/samples_per_s": record["samples_per_s"],
                                **{f"train/{k}": v for k, v in record.items() if k.startswith(("loss/", "anneal/"))}})
        log.routing(self.step, self._routing_stats())
        self._window.reset()

    def _routing_stats(self) -> dict:
        from ..insight import routing_stats

        return routing_stats(self.raw)

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
    def _log_images(self) -> None:
        """TensorBoard: the first eval example's prediction and target, and the selector map of
        every switched layer on it."""
        if not self.is_main or self.logger.writer is None or len(self.eval_dataset) == 0:
            return
        from ..insight import selector_maps
        from ..viz import selector_map_image

        item = self.eval_dataset[0]
        batch = to_device({k: v[None] if isinstance(v, torch.Tensor) else v for k, v in item.items()}, self.device)
        model = self.raw
        if self.task_spec.sample_tags is not None:
            was = model.training
            model.eval()
            try:
                outputs = self.forward(model, batch)
            finally:
                model.train(was)
            for tag, image in self.task_spec.sample_images(outputs, batch):
                self.logger.image(tag, image, self.step)
        for name, selection in selector_maps(model, batch[self.task_spec.input]).items():
            breadth = model.get_submodule(name).breadth
            self.logger.image(f"selector/{name or 'layer'}", selector_map_image(selection[0], breadth), self.step)
