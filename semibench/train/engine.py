"""The one training loop every method runs in (paper Sec. 4.1: Adam, poly LR, EMA teacher, AMP).

``train(cfg, out_dir)`` trains one run into ``out_dir`` and resumes it from its checkpoint.
:class:`Trainer` builds the method and composes plain parts, each with one job:

- :class:`semibench.train.context.EngineContext`: what the method gets while it is built (segmenters,
  EMA teachers, named optimisers);
- :class:`semibench.train.batches.BatchSource`: the labeled and unlabeled batches of a step;
- :class:`semibench.train.update.Update`: learning rates, loss routing, backward, optimiser and EMA steps;
- :class:`semibench.train.validation.Validator`: the val Dice that selects the best epoch;
- :class:`semibench.train.checkpoint.Checkpoints`: what survives a kill (best epoch and its
  weights, timings), saved to and restored from ``checkpoint.pt``;
- :class:`semibench.train.rundir.RunDirectory`: every file of the run (config, log, checkpoint,
  best.pt, train_done.json) and resuming from them.

:meth:`Trainer.run` is the loop, and its order is part of the contract: per epoch the steps,
the last loss read (a non-finite loss stops the run before anything below), validation,
``best.pt``, the epoch's log line, then the checkpoint. The log line precedes the checkpoint so
that a kill in between replays the epoch, and the replay first drops the epoch's lines.

Execution (:mod:`semibench.train.execution`: ``train.precision``, ``channels_last``, ``fused_adam``,
``compile``): how the steps run on the device, outside the fingerprint. The loop does not wait
for the device per step: :meth:`Trainer.run_step` queues its losses there, and they are read and
checked every ``progress.LOG_EVERY`` steps and at the end of each epoch (:meth:`Trainer.train_step`
reads them at once, before the update).

Epochs are 0-based everywhere in files (``StepInfo.epoch`` too).

Reproducibility: the data order and augmentation seeds of a step are functions of (seed, epoch,
iteration) (:mod:`semibench.train.batches`), and the global RNGs (dropout, a method's own sampling)
are re-seeded from (seed, epoch) at the start of each epoch. A run resumed after epoch k
therefore replays epochs k+1.. exactly as an uninterrupted run: bit for bit on the CPU, where
deterministic algorithms are enforced. A method whose state must survive a resume (a feature
bank, a counter) must keep it in its ``state_dict`` (buffers or ``get_extra_state``).
"""
from __future__ import annotations

import importlib
import random
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from semibench.config import RunConfig
from semibench.contract import build_method, method_class
from semibench.data.augment import AugmentConfig, augment_config
from semibench.data.loading import TrainData, derive_seed, iterations_per_epoch, load_train_data
from semibench.errors import ConfigError, TrainingError
from semibench.method import Method, StepInfo
from semibench.train.batches import BatchSource
from semibench.train.checkpoint import Checkpoints
from semibench.train.context import EngineContext, weights_fell_back, weights_note
from semibench.train.device import device_name, resolve_device
from semibench.train.execution import LossQueue, nonfinite_loss_message, prepare_networks, resolve_execution
from semibench.train.progress import EpochLog
from semibench.train.rundir import RunDirectory, RunLog, peak_memory_mb, versions
from semibench.train.update import Update
from semibench.train.validation import MODEL_SELECTION, Validator

STREAM_INIT, STREAM_EPOCH = 11, 12  # random streams (see data.STREAM_*)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def _set_deterministic(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms``, which also sets inductor's copy of the flag and
    so imports ``torch._inductor`` (about 1 s of every job). The flag itself is torch's; inductor's
    copy matters only to compiled code, so it is set only when inductor is loaded already (a
    compiling run loads it first, :func:`determinism`)."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


@contextmanager
def determinism(enabled: bool, device: torch.device, compile: bool = False) -> Iterator[None]:
    """Deterministic kernels for the duration of a run, then the previous global settings.
    On the CPU ``torch.use_deterministic_algorithms`` is enforced; on CUDA only cuDNN's
    deterministic mode (several CUDA backward kernels, e.g. bilinear upsampling, have no
    deterministic variant, and forcing them would fail the run). ``compile``: the run will use
    torch.compile, whose inductor keeps its own copy of the flag."""
    if compile:
        importlib.import_module("torch._inductor.config")  # so _set_deterministic sets its copy too
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if device.type == "cpu":
            _set_deterministic(enabled)
        else:
            torch.backends.cudnn.deterministic = enabled
            torch.backends.cudnn.benchmark = not enabled
        yield
    finally:
        _set_deterministic(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


class Trainer:
    """One run. ``train()`` is the entry point; the class is exposed so that tests and
    benchmarks can drive single steps."""

    def __init__(self, cfg: RunConfig, out_dir: Path, data: TrainData | None = None,
                 aug: AugmentConfig | None = None):
        cfg = cfg.resolved()  # the method's complete hyperparameters, in every file it writes
        self.cfg, self.run_dir = cfg, RunDirectory(out_dir)
        t = cfg.train
        for name in ("epochs", "batch_labeled", "batch_unlabeled", "input_size", "eval_batch_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        self.lr = float("nan")
        self.device = resolve_device(cfg.device)
        self.method_cls = method_class(cfg.method)
        self.ratio = self.method_cls.fixed_ratio or cfg.ratio
        views = self.method_cls.unlabeled_views
        self.data = data if data is not None else load_train_data(
            cfg.data_dir, cfg.splits_dir, cfg.dataset, cfg.seed, self.ratio, t.input_size,
            with_unlabeled=views is not None)
        if views is not None and len(self.data.unlabeled) == 0:
            raise ConfigError(f"method {cfg.method!r} trains on unlabeled data, but ratio 1/{self.ratio} "
                              f"leaves no unlabeled samples")
        # one epoch's steps (StepInfo.iterations is the whole run's: self.total)
        self.iterations_per_epoch = iterations_per_epoch(
            len(self.data.labeled), len(self.data.unlabeled_ids), t.batch_labeled, t.batch_unlabeled,
            t.iters_per_epoch)
        self.total = self.iterations_per_epoch * t.epochs
        self.batches = BatchSource(cfg, self.data, self.method_cls,
                                   aug if aug is not None else augment_config(t.augment),
                                   self.device, self.iterations_per_epoch)
        self.execution = resolve_execution(t, self.device)
        self.amp = self.execution.dtype is not None  # autocast on (CUDA bf16 or fp16)

        seed_everything(derive_seed(cfg.seed, STREAM_INIT))
        self.ctx = EngineContext(cfg, self.device, fused_adam=self.execution.fused_adam)
        self.method: Method = build_method(self.method_cls, self.ctx, cfg.method_params, t.backbone).to(self.device)
        prepare_networks(self.method, self.ctx.segmenters + [te for _, te, _ in self.ctx.emas], self.execution)
        self.update = Update(self.ctx, torch.amp.GradScaler("cuda", enabled=self.execution.grad_scaling),
                             self.total, t.poly_power, cfg.method)
        self.validator = Validator(cfg, self.data, self.device, self.execution)
        self.loss_queue = LossQueue()  # losses of the steps not yet read (no per-step sync)
        self.checkpoints = Checkpoints(cfg, self.run_dir, self.method, self.ctx, self.update.scaler, self.device)
        self.val_extra: dict[str, float] = {}  # val_dice/<name> of extra_validation_models()

    @property
    def images_per_step(self) -> int:
        return self.batches.images_per_step

    # -- one step ------------------------------------------------------------------------
    def train_step(self, epoch: int, it: int) -> dict[str, float]:
        """One optimisation step; returns the losses as floats (a host synchronisation). Raises
        :class:`TrainingError` on a non-finite loss, before the backward pass and any optimiser
        step. The training loop uses :meth:`run_step` instead."""
        return self._step(epoch, it, read_now=True)

    def run_step(self, epoch: int, it: int) -> None:
        """One optimisation step without a host synchronisation: its losses are queued on the
        device until :meth:`read_losses`."""
        self._step(epoch, it, read_now=False)

    def read_losses(self) -> list[dict[str, float]]:
        """The losses of the steps run since the last read, in step order; :class:`TrainingError`
        naming the first step with a non-finite loss (see :mod:`semibench.train.execution`)."""
        return self.loss_queue.read(self._where, self._context())

    def step_info(self, epoch: int, it: int) -> StepInfo:
        t = self.cfg.train
        return StepInfo(epoch=epoch, epochs=t.epochs, iteration=epoch * self.iterations_per_epoch + it,
                        iterations=self.total, unsup_active=epoch >= t.unsup_start_epoch,
                        unsup_start_iteration=t.unsup_start_epoch * self.iterations_per_epoch)

    def _where(self, step: tuple[int, int, int]) -> str:
        iteration, epoch, it = step
        return f"step {iteration} (epoch {epoch}, iteration {it} of the epoch; 0-based)"

    def _context(self) -> str:
        return f" in {self.cfg.method} run {self.cfg.dataset} 1/{self.ratio} seed {self.cfg.seed}"

    def _step(self, epoch: int, it: int, read_now: bool) -> dict[str, float] | None:
        info = self.step_info(epoch, it)
        iteration = info.iteration
        self.lr = self.update.set_lr(iteration)
        batch = self.batches.batch(epoch, it)
        with self.execution.autocast():
            losses = self.method.training_step(batch, info)
        per_optimizer = self.update.route(losses)
        if per_optimizer:  # the logged total; nothing back-propagates it
            losses = {"loss": sum(v.detach().float() for _, v in per_optimizer), **losses}
        names, stacked = self.update.stack(losses)
        values = None
        if read_now:
            host = stacked.cpu().tolist()
            message = nonfinite_loss_message(names, host, self._where((iteration, epoch, it)), self._context())
            if message:
                raise TrainingError(message)
            values = dict(zip(names, host))
        else:
            self.loss_queue.push(names, stacked, (iteration, epoch, it))
        self.update.apply(losses["loss"], per_optimizer)
        self.update.teachers(iteration)
        return values

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> float:
        """The model selection score (:class:`semibench.train.validation.Validator`); the Dice of
        ``extra_validation_models()`` lands in ``val_extra``."""
        score, self.val_extra = self.validator.score(self.method)
        return score

    # -- the run -------------------------------------------------------------------------
    def run(self, on_epoch_end: Callable[[int], None] | None = None) -> Path:
        cfg, t, rd, ck = self.cfg, self.cfg.train, self.run_dir, self.checkpoints
        ck.resume()
        rd.start(cfg, ck.start_epoch)
        infos = self.ctx.weights_info()
        note = weights_note(infos)
        if weights_fell_back(infos):
            warnings.warn(note, stacklevel=2)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if ck.start_epoch < t.epochs:
            ck.execution_history.append({"first_epoch": ck.start_epoch, "device": str(self.device),
                                         **self.execution.record()})
        wall0 = time.perf_counter()
        with rd.open_log() as log:
            for epoch in range(ck.start_epoch, t.epochs):
                seed_everything(derive_seed(cfg.seed, STREAM_EPOCH, epoch))
                epoch_losses, lr, train_s = self._train_epoch(epoch, log)
                v0 = time.perf_counter()
                val_dice = self.validate()
                val_s = time.perf_counter() - v0
                ck.timings["val_s"] += val_s
                ck.consider(epoch, val_dice)
                # the log line before the checkpoint: a kill in between replays the epoch, and
                # the replay first drops the epoch's lines
                log.write(event="epoch", epoch=epoch, iteration=(epoch + 1) * self.iterations_per_epoch,
                          lr=lr, losses=epoch_losses, val_dice=val_dice, **self.val_extra,
                          best_epoch=ck.best["epoch"], best_val_dice=ck.best["val_dice"],
                          img_per_s=self.iterations_per_epoch * self.images_per_step / max(train_s, 1e-9),
                          train_s=train_s, val_s=val_s, peak_mem_mb=peak_memory_mb(self.device))
                ck.save(epoch)
                if on_epoch_end is not None:
                    on_epoch_end(epoch)
        ck.restore_best()
        rd.write_done(done_record(self, infos, note, time.perf_counter() - wall0))
        return rd.path

    def _train_epoch(self, epoch: int, log: RunLog) -> tuple[dict[str, float], float, float]:
        cfg = self.cfg
        self.method.train()
        progress = EpochLog(log, epoch, self.iterations_per_epoch, self.images_per_step, self.device,
                            f"{cfg.method} {cfg.dataset} 1/{self.ratio} seed{cfg.seed} "
                            f"epoch {epoch + 1}/{cfg.train.epochs}")
        for it in range(self.iterations_per_epoch):
            try:
                self.run_step(epoch, it)
            except Exception as e:
                self._raise_queued_nonfinite(e)
                raise
            progress.step_done(it, self.lr, self.read_losses)
        epoch_losses, train_s = progress.close()
        self.checkpoints.timings["train_s"] += train_s
        self.checkpoints.timings["images"] += self.iterations_per_epoch * self.images_per_step
        return epoch_losses, self.lr, train_s

    def _raise_queued_nonfinite(self, error: Exception) -> None:
        """A step failed: when a queued loss was already non-finite, that is the cause to
        report (a method may fail on the NaN weights a later step sees)."""
        try:
            self.read_losses()
        except TrainingError as e:
            raise e from error
        except Exception:
            pass  # the queue cannot be read (e.g. a failed CUDA context): report the step's error



def done_record(tr: Trainer, infos: list[dict], note: str, wall_s: float) -> dict:
    """``train_done.json``: what the run was, where and how it ran, and how long it took."""
    cfg, ck, tm = tr.cfg, tr.checkpoints, tr.checkpoints.timings
    return {
        "dataset": cfg.dataset, "method": cfg.method, "ratio": tr.ratio, "seed": cfg.seed,
        "epochs": cfg.train.epochs, "iterations_per_epoch": tr.iterations_per_epoch,
        "n_labeled": len(tr.data.labeled), "n_unlabeled": len(tr.data.unlabeled_ids),
        "n_val": len(tr.data.val),
        # 0 for a method that never loads an unlabeled image (SupOnly, FullSup): the report's
        # "selected before the unsupervised start" footnote concerns the others only
        "unlabeled_per_step": tr.batches.n_unlabeled_batches * cfg.train.batch_unlabeled,
        "best_epoch": ck.best["epoch"], "best_val_dice": ck.best["val_dice"],
        "model_selection": MODEL_SELECTION,
        "versions": versions(),
        "device": {"spec": cfg.device, "device": str(tr.device), "name": device_name(tr.device),
                   "amp": tr.amp, "threads": torch.get_num_threads()},
        # this process's options, and those of each process that trained epochs of the run
        "execution": {**tr.execution.record(), "history": ck.execution_history},
        "weights_info": {"segmenters": infos, "note": note},
        "timings": {"train_s": tm["train_s"], "val_s": tm["val_s"],
                    "total_s": tm["train_s"] + tm["val_s"], "this_process_wall_s": wall_s,
                    "images": tm["images"],
                    "img_per_s": tm["images"] / tm["train_s"] if tm["train_s"] else None,
                    "peak_mem_mb": peak_memory_mb(tr.device)},
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
    }


def train(cfg: RunConfig, out_dir: Path, *, on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """Train one run into ``out_dir`` (created if needed), resuming from its ``checkpoint.pt``.
    Returns ``out_dir``. A finished run (``train_done.json`` under the same config) is not
    trained again. ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written."""
    cfg = cfg.resolved()  # compare complete hyperparameters with what the directory holds
    run_dir = RunDirectory(out_dir)
    if run_dir.finished(cfg):  # also refuses another config, before any data is loaded
        return run_dir.path
    run_dir.path.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # autocast and cuDNN follow the current device
    with determinism(cfg.train.deterministic, device, compile=cfg.train.compile):
        trainer = Trainer(cfg, run_dir.path)
        return trainer.run(on_epoch_end=on_epoch_end)
