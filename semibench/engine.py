"""The one training loop every method runs in (paper Sec. 4.1: Adam, poly LR, EMA teacher, AMP).

``train(cfg, out_dir)`` writes into ``out_dir``:

- ``config.json``: the run config (``RunConfig.to_dict()``);
- ``train.jsonl``: one JSON line per logging interval (``"event": "train"``) and per epoch
  (``"event": "epoch"``, with ``val_dice``: the per-image mean Dice over the val samples at their
  original size, the table's convention and the model selection score); losses, lr, img/s, peak memory (MB; CUDA
  ``max_memory_allocated``, or the process's peak RSS on the CPU);
- ``checkpoint.pt`` after every epoch: method state (students *and* teachers), every optimiser
  (by its ``ctx.add_optimizer`` name),
  the AMP scaler, the epoch, the best so far and the config fingerprint. A later ``train`` on the
  same directory resumes from it, and refuses when the config differs (naming the keys);
- ``best.pt``: ``{"model": inference model state_dict, "epoch", "val_dice", "config"}`` of the
  epoch with the highest validation dice (the first such epoch on ties). The checkpoint carries a
  copy (``best_model``), so a resumed run rewrites ``best.pt`` when it is missing or stale: Snakemake
  deletes an interrupted job's declared outputs, and the replayed epochs need not beat the best
  one again. A truncated or corrupt checkpoint stops the run with one line, before anything in
  the run directory is written;
- ``train_done.json`` last: metadata (versions, device, execution options, weights, timings,
  best epoch).

Execution (:mod:`semibench.execution`: ``train.precision``, ``channels_last``, ``fused_adam``,
``compile``): how the steps run on the device, outside the fingerprint. The loop does not wait
for the device per step: :meth:`Trainer.run_step` queues its losses there, and they are read and
checked every ``LOG_EVERY`` steps and at the end of each epoch, before its validation and
checkpoint (:meth:`Trainer.train_step` reads them at once, before the update).

Epochs are 0-based everywhere in files (``StepInfo.epoch`` too). Every file is written to a
temporary sibling and renamed, so none is ever partial.

Reproducibility: the data order and augmentation seeds of a step are functions of (seed, epoch,
iteration) (:class:`semibench.data.BatchSchedule`), and the global RNGs (dropout, a method's own
sampling) are re-seeded from (seed, epoch) at the start of each epoch. A run resumed after
epoch k therefore replays epochs k+1.. exactly as an uninterrupted run: bit for bit on the CPU,
where deterministic algorithms are enforced. A method whose state must survive a resume (a
feature bank, a counter) must keep it in its ``state_dict`` (buffers or ``get_extra_state``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import semibench

from .atomic import write_atomic
from .augment import VIEW_KINDS, AugmentConfig, augment_config, augment_labeled, make_views
from .config import RunConfig
from .data import (BatchSchedule, SampleCache, TrainData, derive_seed, iterations_per_epoch,
                   load_train_data, make_generator)
from .device import device_name, resolve_device
from .ema import TeacherSettings, ema_update, make_teacher
from .errors import ConfigError, TrainingError
from .execution import (LossQueue, match_state_layouts, nonfinite_loss_message, prepare_networks,
                        resolve_execution, to_device)
from .method import Batch, Method, MethodContext, StepInfo, check_method_class, make_hparams
from .metrics import Counts, per_image_mean
from .prepared import PreparedDataset
from .registry import METHODS
from .schedules import poly_lr
from .status import write_host_file

MODEL_SELECTION = "val per-image mean dice at the original size (Trainer.validate)"
LOG_EVERY = 25  # iterations between "train" lines in train.jsonl (and between loss reads)
LOSS_PREFIX = "loss/"  # "loss/<optimiser name>": a loss stepped by that optimiser only
CHECKPOINT_FORMAT = 2  # 2: carries best_model (format 1 resumes while its best.pt is intact)
STREAM_INIT, STREAM_EPOCH, STREAM_AUG = 11, 12, 13  # random streams (see data.STREAM_*)
STREAM_MORE_UNLABELED = 14  # seeds of the sample streams of unlabeled batches 1..n-1


# ---------------------------------------------------------------------------- small helpers

def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def torch_save_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda p: torch.save(obj, p))


def versions() -> dict[str, str]:
    import torchvision
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "numpy": np.__version__,
         "semibench": semibench.__version__}
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
        v["cudnn"] = str(torch.backends.cudnn.version())
    return v


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


@contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of a run, then the previous global settings.
    On the CPU ``torch.use_deterministic_algorithms`` is enforced; on CUDA only cuDNN's
    deterministic mode (several CUDA backward kernels, e.g. bilinear upsampling, have no
    deterministic variant, and forcing them would fail the run)."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(enabled)
        else:
            torch.backends.cudnn.deterministic = enabled
            torch.backends.cudnn.benchmark = not enabled
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key (saved → current)`` for every fingerprint key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key} ({a!r} → {b!r})")
    return out


def _check_same_config(saved_items: dict, cfg: RunConfig, path: Path) -> None:
    diff = config_differences(RunConfig.comparable_items(saved_items), cfg.fingerprint_items())
    if diff:
        raise TrainingError(f"{path} was written under another config; differing keys: "
                            f"{', '.join(diff)}. Use the original config, or delete {path.parent} "
                            f"to start this run over")


def _read_saved_config(path: Path, key: str | None) -> dict | None:
    """Fingerprint items of the config stored in a JSON file (under ``key``), or None."""
    try:
        d = json.loads(path.read_text())
        d = d.get(key) if key else d
        return RunConfig.from_dict(d).fingerprint_items() if isinstance(d, dict) else None
    except (OSError, json.JSONDecodeError, TypeError):
        return None


CHECKPOINT_KEYS = ("format", "epoch", "method", "optimizers", "best", "timings", "config_items")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The state in ``checkpoint.pt``, or one-line :class:`TrainingError` naming the file and what
    to do when it is truncated, corrupt or not a semibench checkpoint (never half-loaded)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(f"{path} is truncated or corrupt ({type(e).__name__}: {first}); delete "
                            f"it to restart this run from scratch (the other runs are not affected)") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainingError(f"{path} is not a semibench checkpoint (missing {', '.join(missing)}); "
                            f"delete it to restart this run from scratch")
    return state


def make_segmenter(cfg: RunConfig, **model_options) -> nn.Module:
    """A fresh DenseUNet from the run's model config; ``model_options`` are
    :func:`semibench.model.build_model`'s keyword options (num_classes, proj_dim, proj_pool)."""
    from .model import build_model
    known = {"num_classes", "proj_dim", "proj_pool"}
    unknown = sorted(set(model_options) - known)
    if unknown:
        raise ConfigError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return build_model(cfg.train.backbone, cfg.train.weights, **model_options)


# ---------------------------------------------------------------------------- method context

class EngineContext(MethodContext):
    """What a method gets while it is built: segmenters, EMA teachers and optimisers that the
    engine then schedules, steps and checkpoints."""

    def __init__(self, cfg: RunConfig, device: torch.device, fused_adam: bool = False):
        self.cfg, self.device = cfg, device
        self.fused_adam = fused_adam  # train.fused_adam where it applies (CUDA)
        self.segmenters: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []  # registration order
        self.optimizer_names: list[str] = []  # the same order; checkpoints key optimisers by name
        self.emas: list[tuple[nn.Module, nn.Module, TeacherSettings]] = []  # (student, teacher, settings)

    def build_segmenter(self, **model_options) -> nn.Module:
        net = make_segmenter(self.cfg, **model_options).to(self.device)
        self.segmenters.append(net)
        return net

    def ema_of(self, module: nn.Module, alpha: float | None = None, *, average_buffers: bool = True,
               warmup: bool = False, mode: str = "eval") -> nn.Module:
        """A frozen copy of ``module``, updated after every optimiser step (semibench.ema):
        ``alpha`` (default: the run's ``train.ema_alpha``), ``average_buffers`` (BN statistics
        averaged too, or parameters only), ``warmup`` (α_t = min(1 − 1/(t+1), α)) and ``mode``
        (``"eval"``: always eval; ``"train"``: follows the method's mode)."""
        settings = TeacherSettings(alpha=self.cfg.train.ema_alpha if alpha is None else float(alpha),
                                   average_buffers=bool(average_buffers), warmup=bool(warmup), mode=mode)
        teacher = make_teacher(module, mode)
        self.emas.append((module, teacher, settings))
        return teacher

    def add_optimizer(self, params, name: str = "main", **adam_options) -> torch.optim.Optimizer:
        """An Adam optimiser named ``name`` over ``params``, poly-scheduled from its own initial
        lr (``lr`` in ``adam_options``, default the run's ``train.lr``), stepped and checkpointed
        by the engine. ``adam_options`` are ``torch.optim.Adam``'s (lr, betas, eps,
        weight_decay, ...). Names are unique, and no parameter belongs to two optimisers (it
        would be stepped twice, or by a loss that is not its own)."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"optimiser name must be a non-empty string without '/', got {name!r}")
        if name in self.optimizer_names:
            raise ConfigError(f"optimiser {name!r} is registered twice (give each ctx.add_optimizer "
                              f"call its own name)")
        params = [p for p in params]
        if not params:
            raise ConfigError(f"optimiser {name!r} got no parameters")
        taken = {id(p): n for n, o in zip(self.optimizer_names, self.optimizers)
                 for g in o.param_groups for p in g["params"]}
        shared = sorted({taken[id(p)] for p in params if id(p) in taken})
        if shared:
            raise ConfigError(f"optimiser {name!r} shares parameters with optimiser(s) "
                              f"{', '.join(map(repr, shared))}")
        adam_options.setdefault("lr", self.cfg.train.lr)
        if self.fused_adam and "foreach" not in adam_options:
            adam_options.setdefault("fused", True)
        try:
            opt = torch.optim.Adam(params, **adam_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimiser {name!r}: bad Adam options {adam_options}: {e}") from None
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]  # the poly schedule's base, saved with the state
        self.optimizers.append(opt)
        self.optimizer_names.append(name)
        return opt

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(zip(self.optimizer_names, self.optimizers))

    def check_optimizers(self, method: nn.Module, method_name: str) -> None:
        """Refuse an optimiser that the method built itself: the engine would neither schedule,
        step nor checkpoint it."""
        mine = {id(o) for o in self.optimizers}
        for mod_name, mod in method.named_modules():
            for attr, value in vars(mod).items():
                items = value.values() if isinstance(value, dict) else (
                    value if isinstance(value, (list, tuple)) else (value,))
                for v in items:
                    if isinstance(v, torch.optim.Optimizer) and id(v) not in mine:
                        where = f"{mod_name}.{attr}" if mod_name else attr
                        raise ConfigError(f"method {method_name!r} built an optimiser itself "
                                          f"({where}: {type(v).__name__}); register it with "
                                          f"ctx.add_optimizer(params, name=...) so the engine "
                                          f"schedules, steps and checkpoints it")

    def update_teachers(self, iteration: int) -> None:
        """The EMA step after the optimiser step of global iteration ``iteration`` (0-based; the
        warm-up's t, a function of the step, so a resumed run continues it exactly)."""
        for student, teacher, settings in self.emas:
            ema_update(teacher, student, settings.alpha_at(iteration), settings.average_buffers)

    def weights_info(self) -> list[dict]:
        return [dict(getattr(net, "weights_info", {"used": "unknown"})) for net in self.segmenters]


def weights_fell_back(infos: list[dict]) -> list[dict]:
    """The networks that asked for ImageNet weights and started from random init instead."""
    return [i for i in infos if i.get("requested") == "imagenet" and i.get("used") == "random-init"]


def weights_note(infos: list[dict]) -> str:
    """One sentence for the metadata: were the requested ImageNet weights used?"""
    fallback = weights_fell_back(infos)
    if fallback:
        return ("ImageNet weights were requested but UNAVAILABLE: the network(s) were trained from "
                f"RANDOM INITIALISATION ({fallback[0].get('reason', '')})")
    used = sorted({str(i.get("used")) for i in infos})
    return "weights used: " + ", ".join(used)


# ---------------------------------------------------------------------------- trainer

class Trainer:
    """One run. ``train()`` is the entry point; the class is exposed so that tests and
    benchmarks can drive single steps."""

    def __init__(self, cfg: RunConfig, out_dir: Path, data: TrainData | None = None,
                 aug: AugmentConfig | None = None):
        cfg = cfg.resolved()  # the method's complete hyperparameters, in every file it writes
        self.cfg, self.out_dir = cfg, Path(out_dir)
        t = cfg.train
        self.aug = aug if aug is not None else augment_config(t.augment)
        for name in ("epochs", "batch_labeled", "batch_unlabeled", "input_size", "eval_batch_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        self.lr = float("nan")
        self.device = resolve_device(cfg.device)
        self.method_cls = METHODS.get(cfg.method)
        check_method_class(self.method_cls, VIEW_KINDS)
        hp_cls = self.method_cls.Hparams
        self.hparams = (make_hparams(hp_cls, cfg.method_params)
                        if dataclasses.is_dataclass(hp_cls) else None)
        self.ratio = self.method_cls.fixed_ratio or cfg.ratio
        self.views = self.method_cls.unlabeled_views
        self.n_unlabeled_batches = self.method_cls.unlabeled_batches if self.views is not None else 0
        self.data = data if data is not None else load_train_data(
            cfg.data_dir, cfg.splits_dir, cfg.dataset, cfg.seed, self.ratio, t.input_size,
            with_unlabeled=self.views is not None)
        if self.views is not None and len(self.data.unlabeled) == 0:
            raise ConfigError(f"method {cfg.method!r} trains on unlabeled data, but ratio 1/{self.ratio} "
                              f"leaves no unlabeled samples")
        # one epoch's steps (StepInfo.iterations is the whole run's: self.total)
        self.iterations_per_epoch = iterations_per_epoch(
            len(self.data.labeled), len(self.data.unlabeled_ids), t.batch_labeled, t.batch_unlabeled,
            t.iters_per_epoch)
        self.total = self.iterations_per_epoch * t.epochs
        self.schedule = BatchSchedule(len(self.data.labeled), len(self.data.unlabeled), t.batch_labeled,
                                      t.batch_unlabeled, cfg.seed, self.iterations_per_epoch)
        # unlabeled batches 1..n-1: each its own sample stream (only its unlabeled part is read)
        self.more_schedules = [
            BatchSchedule(len(self.data.labeled), len(self.data.unlabeled), t.batch_labeled,
                          t.batch_unlabeled, derive_seed(cfg.seed, STREAM_MORE_UNLABELED, j),
                          self.iterations_per_epoch)
            for j in range(1, max(1, self.n_unlabeled_batches))]
        self.execution = resolve_execution(t, self.device)
        self.amp = self.execution.dtype is not None  # autocast on (CUDA bf16 or fp16)
        self.images_per_step = t.batch_labeled + self.n_unlabeled_batches * t.batch_unlabeled

        seed_everything(derive_seed(cfg.seed, STREAM_INIT))
        self.ctx = EngineContext(cfg, self.device, fused_adam=self.execution.fused_adam)
        self.method: Method = self.method_cls(self.ctx, self.hparams).to(self.device)
        if not self.ctx.optimizers:
            raise ConfigError(f"method {cfg.method!r} registered no optimiser (ctx.add_optimizer)")
        self.ctx.check_optimizers(self.method, cfg.method)
        prepare_networks(self.method, self.ctx.segmenters + [te for _, te, _ in self.ctx.emas], self.execution)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.execution.grad_scaling)
        self.loss_queue = LossQueue()  # losses of the steps not yet read (no per-step sync)
        self.eval_set = None  # the val samples on the device (semibench.evaluate.EvalSet)
        # the execution options of each process that trained part of this run
        self.execution_history: list[dict] = []

        self.start_epoch = 0
        self.val_extra: dict[str, float] = {}  # val_dice/<name> of extra_validation_models()
        self.best = {"epoch": -1, "val_dice": -math.inf}
        self.best_model: dict | None = None  # inference state_dict (CPU) of the best epoch
        self.timings = {"train_s": 0.0, "val_s": 0.0, "images": 0}

    # -- state ---------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,  # last completed epoch (0-based)
            "method": self.method.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.ctx.named_optimizers().items()},
            "scaler": self.scaler.state_dict(),
            "best": dict(self.best),
            "best_model": self.best_model,  # best.pt can always be re-derived (Snakemake deletes it)
            "timings": dict(self.timings),
            "execution_history": list(self.execution_history),
            "fingerprint": self.cfg.fingerprint(),
            "config_items": self.cfg.fingerprint_items(),
        }

    def load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path, self.device)
        _check_same_config(state.get("config_items", {}), self.cfg, path)
        saved_opts = state["optimizers"]
        if isinstance(saved_opts, list):  # written before optimisers had names: registration order
            saved_opts = {(self.ctx.optimizer_names[i] if i < len(self.ctx.optimizers) else f"#{i}"): o
                          for i, o in enumerate(saved_opts)}
        if sorted(saved_opts) != sorted(self.ctx.optimizer_names):
            raise TrainingError(f"{path} holds optimiser states {sorted(saved_opts)}, the method has "
                                f"{sorted(self.ctx.optimizer_names)}; delete {path} to start the run over")
        try:
            self.method.load_state_dict(state["method"])
            for name, opt in self.ctx.named_optimizers().items():
                opt.load_state_dict(saved_opts[name])
            match_state_layouts(self.ctx.optimizers)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"{path} does not fit this run's method ({first}); delete it to "
                                f"start the run over") from None
        if state.get("scaler") and self.scaler.is_enabled():  # AMP state only matters on CUDA
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = dict(state["best"])
        self.best_model = state.get("best_model")
        self.timings = dict(state["timings"])
        self.execution_history = list(state.get("execution_history") or [])

    # -- one step ------------------------------------------------------------------------
    def set_lr(self, iteration: int) -> float:
        for opt in self.ctx.optimizers:
            for group in opt.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], iteration, self.total, self.cfg.train.poly_power)
        return self.ctx.optimizers[0].param_groups[0]["lr"]

    def make_batch(self, epoch: int, it: int) -> Batch:
        dev, d = self.device, self.data
        gen = make_generator(self.cfg.seed, STREAM_AUG, epoch, it)
        idx = self.schedule.labeled(epoch, it)
        x, y = augment_labeled(to_device(d.labeled.images[idx], dev), to_device(d.labeled.masks[idx], dev),
                               gen, self.aug)
        unlabeled, more = {}, []
        if self.views is not None:
            u = to_device(d.unlabeled.images[self.schedule.unlabeled(epoch, it)], dev)
            unlabeled = make_views(self.views, u, gen, self.aug, **self.method_cls.view_options)
            for j, schedule in enumerate(self.more_schedules, start=1):
                u = to_device(d.unlabeled.images[schedule.unlabeled(epoch, it)], dev)
                gen_j = make_generator(self.cfg.seed, STREAM_AUG, epoch, it, j)
                more.append(make_views(self.views, u, gen_j, self.aug, **self.method_cls.view_options))
        return Batch(labeled_image=x, labeled_mask=y, unlabeled=unlabeled, more_unlabeled=more)

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
        naming the first step with a non-finite loss (see :mod:`semibench.execution`)."""
        return self.loss_queue.read(self._where, self._context())

    def _where(self, step: tuple[int, int, int]) -> str:
        iteration, epoch, it = step
        return f"step {iteration} (epoch {epoch}, iteration {it} of the epoch; 0-based)"

    def _context(self) -> str:
        return f" in {self.cfg.method} run {self.cfg.dataset} 1/{self.ratio} seed {self.cfg.seed}"

    def _step(self, epoch: int, it: int, read_now: bool) -> dict[str, float] | None:
        t = self.cfg.train
        iteration = epoch * self.iterations_per_epoch + it
        self.lr = self.set_lr(iteration)
        batch = self.make_batch(epoch, it)
        info = StepInfo(epoch=epoch, epochs=t.epochs, iteration=iteration, iterations=self.total,
                        unsup_active=epoch >= t.unsup_start_epoch,
                        unsup_start_iteration=t.unsup_start_epoch * self.iterations_per_epoch)
        with self.execution.autocast():
            losses = self.method.training_step(batch, info)
        per_optimizer = self._per_optimizer_losses(losses)
        if per_optimizer:  # the logged total; nothing back-propagates it
            losses = {"loss": sum(v.detach().float() for _, v in per_optimizer), **losses}
        names, stacked = self._stack_losses(losses)
        values = None
        if read_now:
            host = stacked.cpu().tolist()
            message = nonfinite_loss_message(names, host, self._where((iteration, epoch, it)), self._context())
            if message:
                raise TrainingError(message)
            values = dict(zip(names, host))
        else:
            self.loss_queue.push(names, stacked, (iteration, epoch, it))
        self._update(losses["loss"], per_optimizer)
        self.ctx.update_teachers(iteration)
        return values

    def _per_optimizer_losses(self, losses: dict) -> list[tuple[str, torch.Tensor]]:
        """``[(optimiser name, loss)]`` in the method's order for ``"loss/<name>"`` keys, or []
        for a method that returns one ``"loss"`` (see ``semibench.method``, update steps)."""
        prefixed = [(k[len(LOSS_PREFIX):], torch.as_tensor(v, device=self.device))  # a tensor: itself
                    for k, v in losses.items() if k.startswith(LOSS_PREFIX)]
        method = self.cfg.method
        if not prefixed:
            if "loss" not in losses:
                raise TrainingError(f"method {method!r} returned no 'loss' and no "
                                    f"'{LOSS_PREFIX}<optimiser>' losses (got {', '.join(losses)})")
            return []
        if "loss" in losses:
            raise TrainingError(f"method {method!r} returned both 'loss' and per-optimiser losses "
                                f"({', '.join(LOSS_PREFIX + n for n, _ in prefixed)}); return one or the other")
        unknown = [n for n, _ in prefixed if n not in self.ctx.optimizer_names]
        if unknown:
            raise TrainingError(f"method {method!r} returned losses for unknown optimiser(s) "
                                f"{', '.join(map(repr, unknown))}; registered: "
                                f"{', '.join(map(repr, self.ctx.optimizer_names))}")
        return prefixed

    def _update(self, total: torch.Tensor, per_optimizer: list[tuple[str, torch.Tensor]]) -> None:
        """Zero every optimiser; back-propagate (AMP-scaled) either ``total`` once, or each
        per-optimiser loss in the method's order into its own optimiser's parameters only
        (``backward(inputs=...)``); then step, in registration order, every optimiser that got a
        gradient; then one ``scaler.update()``. All backward passes run before any step: every
        forward of the step ran before them, so this equals stepping each optimiser right after
        its own backward, and a loss whose graph runs through another optimiser's parameters
        (GCT's L_fc through the flaw detector) still finds them unmodified."""
        for opt in self.ctx.optimizers:
            opt.zero_grad(set_to_none=True)
        if not per_optimizer:
            self.scaler.scale(total).backward()
        named = self.ctx.named_optimizers()
        for i, (name, loss) in enumerate(per_optimizer):
            params = [p for g in named[name].param_groups for p in g["params"] if p.requires_grad]
            if loss.requires_grad and params:  # e.g. a term that is off before unsup_start_epoch
                self.scaler.scale(loss).backward(inputs=params, retain_graph=i < len(per_optimizer) - 1)
        stepped = False
        for opt in self.ctx.optimizers:
            # an optimiser without gradient is not stepped: under CUDA AMP GradScaler.step
            # raises "No inf checks were recorded" for it, and Adam would do nothing anyway
            if any(p.grad is not None for g in opt.param_groups for p in g["params"]):
                self.scaler.step(opt)
                stepped = True
        if stepped:
            self.scaler.update()

    def _stack_losses(self, losses: dict) -> tuple[list[str], torch.Tensor]:
        """The names and a 1-D float32 tensor on the device of a step's scalar losses."""
        names, vals = [], []
        for name, v in losses.items():
            v = torch.as_tensor(v).detach()
            if v.numel() != 1:
                raise TrainingError(f"loss {name!r} of method {self.cfg.method!r} is not a scalar "
                                    f"(shape {tuple(v.shape)})")
            names.append(name)
            vals.append(v.float().reshape(()).to(self.device))
        return names, torch.stack(vals)

    # -- validation ----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Model selection score: the per-image mean Dice over the val samples at their original
        size, computed by the code that scores the test set (:class:`semibench.evaluate.EvalSet`:
        resize and argmax on the device, the val inputs kept there between epochs), so the
        selected epoch is the best one in the table's convention."""
        from .evaluate import EvalSet
        model = self.method.inference_model()
        was_training = self.method.training
        if self.eval_set is None:
            source = SampleCache(self.data.val_samples) if self.data.val_samples else PreparedDataset(
                Path(self.cfg.data_dir) / "prepared" / self.cfg.dataset)
            self.eval_set = EvalSet([source.load(i) for i in self.data.val.ids], self.cfg.train.input_size,
                                    self.cfg.train.eval_batch_size, self.device, pad=self.execution.compile)
        def dice(net) -> float:
            rows = self.eval_set.counts(net, self.execution.autocast())
            return per_image_mean([Counts(r["tp"], r["fp"], r["tn"], r["fn"]) for r in rows])["dice"]
        score = dice(model)
        # Method.extra_validation_models: logged as val_dice/<name> in the epoch line, not selected on
        self.val_extra = {f"val_dice/{name}": score if net is model else dice(net)
                          for name, net in self.method.extra_validation_models().items()}
        self.method.train(was_training)
        return score

    # -- the run -------------------------------------------------------------------------
    def run(self, on_epoch_end: Callable[[int], None] | None = None) -> Path:
        cfg, t, out = self.cfg, self.cfg.train, self.out_dir
        ckpt_path = out / "checkpoint.pt"
        if ckpt_path.exists():
            self.load_checkpoint(ckpt_path)
            self._restore_best(out)  # before anything is written: a bad checkpoint changes nothing
        write_json_atomic(out / "config.json", cfg.to_dict())
        write_host_file(out)  # `semibench status` on another host of a shared file system reads it
        log_path = out / "train.jsonl"
        self._truncate_log(log_path, self.start_epoch)
        infos = self.ctx.weights_info()
        note = weights_note(infos)
        if weights_fell_back(infos):
            warnings.warn(note, stacklevel=2)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.start_epoch < t.epochs:
            self.execution_history.append({"first_epoch": self.start_epoch, "device": str(self.device),
                                           **self.execution.record()})
        wall0 = time.perf_counter()
        with open(log_path, "a") as log:
            for epoch in range(self.start_epoch, t.epochs):
                seed_everything(derive_seed(cfg.seed, STREAM_EPOCH, epoch))
                epoch_losses, lr, train_s = self._train_epoch(epoch, log)
                v0 = time.perf_counter()
                val_dice = self.validate()
                val_s = time.perf_counter() - v0
                self.timings["val_s"] += val_s
                if val_dice > self.best["val_dice"]:
                    self.best = {"epoch": epoch, "val_dice": val_dice}
                    self.best_model = {k: v.detach().to("cpu", copy=True)
                                       for k, v in self.method.inference_model().state_dict().items()}
                    self._write_best(out)
                # the log line before the checkpoint: a kill in between replays the epoch, and
                # the replay first drops the epoch's lines
                self._log(log, event="epoch", epoch=epoch, iteration=(epoch + 1) * self.iterations_per_epoch,
                          lr=lr, losses=epoch_losses, val_dice=val_dice, **self.val_extra,
                          best_epoch=self.best["epoch"], best_val_dice=self.best["val_dice"],
                          img_per_s=self.iterations_per_epoch * self.images_per_step / max(train_s, 1e-9),
                          train_s=train_s, val_s=val_s, peak_mem_mb=peak_memory_mb(self.device))
                torch_save_atomic(ckpt_path, self.checkpoint_state(epoch))
                if on_epoch_end is not None:
                    on_epoch_end(epoch)
        self._restore_best(out)
        self._write_done(infos, note, time.perf_counter() - wall0)
        return out

    def _write_best(self, out: Path) -> None:
        torch_save_atomic(out / "best.pt", {
            "model": self.best_model, "epoch": self.best["epoch"], "val_dice": self.best["val_dice"],
            "model_selection": MODEL_SELECTION, "config": self.cfg.to_dict()})

    def _restore_best(self, out: Path) -> None:
        """Make ``best.pt`` hold the best epoch so far. Snakemake deletes an interrupted job's
        declared outputs (best.pt among them) before the rerun, and the resumed epochs need not
        beat the best one again, so the checkpoint's copy is written back."""
        if self.best["epoch"] < 0:
            return
        path = out / "best.pt"
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("epoch") == self.best["epoch"] and isinstance(saved.get("model"), dict):
                    return
            except Exception:
                pass  # unreadable: rewritten below
        if self.best_model is None:
            raise TrainingError(f"{out / 'checkpoint.pt'} has no copy of the best epoch "
                                f"({self.best['epoch']}) and {path} is missing or stale (a checkpoint "
                                f"of an older semibench); delete {out} to start the run over")
        self._write_best(out)

    def _train_epoch(self, epoch: int, log) -> tuple[dict[str, float], float, float]:
        cfg = self.cfg
        self.method.train()
        sums: dict[str, float] = {}
        window: dict[str, float] = {}
        n_window, t_window = 0, time.perf_counter()
        t0 = time.perf_counter()
        bar = tqdm(range(self.iterations_per_epoch),
                   desc=f"{cfg.method} {cfg.dataset} 1/{self.ratio} seed{cfg.seed} "
                   f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, mininterval=1.0, unit="it")
        lr = float("nan")
        for it in bar:
            try:
                self.run_step(epoch, it)
            except Exception as e:
                self._raise_queued_nonfinite(e)
                raise
            lr = self.lr
            n_window += 1
            last = it == self.iterations_per_epoch - 1
            if n_window == LOG_EVERY or (last and n_window):
                # one host synchronisation per window; the epoch's last read precedes its
                # validation and checkpoint, so a non-finite loss stops the run before either
                for values in self.read_losses():
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                        window[k] = window.get(k, 0.0) + v
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t_window
                means = {k: v / n_window for k, v in window.items()}
                self._log(log, event="train", epoch=epoch,
                          iteration=epoch * self.iterations_per_epoch + it + 1, lr=lr, losses=means,
                          img_per_s=n_window * self.images_per_step / max(dt, 1e-9),
                          images_per_step=self.images_per_step,  # for `semibench status` (no import)
                          peak_mem_mb=peak_memory_mb(self.device))
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
                window, n_window, t_window = {}, 0, time.perf_counter()
        bar.close()
        train_s = time.perf_counter() - t0
        self.timings["train_s"] += train_s
        self.timings["images"] += self.iterations_per_epoch * self.images_per_step
        return {k: v / self.iterations_per_epoch for k, v in sums.items()}, lr, train_s

    def _raise_queued_nonfinite(self, error: Exception) -> None:
        """A step failed: when a queued loss was already non-finite, that is the cause to
        report (a method may fail on the NaN weights a later step sees)."""
        try:
            self.read_losses()
        except TrainingError as e:
            raise e from error
        except Exception:
            pass  # the queue cannot be read (e.g. a failed CUDA context): report the step's error

    @staticmethod
    def _log(log, **record) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    @staticmethod
    def _truncate_log(path: Path, start_epoch: int) -> None:
        """Keep only the lines of epochs before ``start_epoch`` (a killed epoch is replayed)."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("epoch", math.inf) < start_epoch:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        write_atomic(path, "".join(line + "\n" for line in keep))

    def _write_done(self, infos: list[dict], note: str, wall_s: float) -> None:
        cfg, tm = self.cfg, self.timings
        done = {
            "dataset": cfg.dataset, "method": cfg.method, "ratio": self.ratio, "seed": cfg.seed,
            "epochs": cfg.train.epochs, "iterations_per_epoch": self.iterations_per_epoch,
            "n_labeled": len(self.data.labeled), "n_unlabeled": len(self.data.unlabeled_ids),
            "n_val": len(self.data.val),
            "best_epoch": self.best["epoch"], "best_val_dice": self.best["val_dice"],
            "model_selection": MODEL_SELECTION,
            "versions": versions(),
            "device": {"spec": cfg.device, "device": str(self.device), "name": device_name(self.device),
                       "amp": self.amp, "threads": torch.get_num_threads()},
            # this process's options, and those of each process that trained epochs of the run
            "execution": {**self.execution.record(), "history": self.execution_history},
            "weights_info": {"segmenters": infos, "note": note},
            "timings": {"train_s": tm["train_s"], "val_s": tm["val_s"],
                        "total_s": tm["train_s"] + tm["val_s"], "this_process_wall_s": wall_s,
                        "images": tm["images"],
                        "img_per_s": tm["images"] / tm["train_s"] if tm["train_s"] else None,
                        "peak_mem_mb": peak_memory_mb(self.device)},
            "fingerprint": cfg.fingerprint(),
            "config": cfg.to_dict(),
        }
        write_json_atomic(self.out_dir / "train_done.json", done)


def _readable_best(path: Path) -> bool:
    try:
        return isinstance(torch.load(path, map_location="cpu", weights_only=True).get("model"), dict)
    except Exception:
        return False


def train(cfg: RunConfig, out_dir: Path, *, on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """Train one run into ``out_dir`` (created if needed), resuming from its ``checkpoint.pt``.
    Returns ``out_dir``. A finished run (``train_done.json`` under the same config) is not
    trained again. ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written."""
    out_dir = Path(out_dir)
    cfg = cfg.resolved()  # compare complete hyperparameters with what the directory holds
    done = out_dir / "train_done.json"
    if done.exists():
        saved = _read_saved_config(done, "config")
        if saved is not None:
            _check_same_config(saved, cfg, done)
            if _readable_best(out_dir / "best.pt") or not (out_dir / "checkpoint.pt").exists():
                return out_dir
            # best.pt lost or damaged after the run finished: re-derived from the checkpoint below
    if (out_dir / "checkpoint.pt").exists():  # refuse before loading any data
        saved = _read_saved_config(out_dir / "config.json", None)
        if saved is not None:
            _check_same_config(saved, cfg, out_dir / "checkpoint.pt")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # autocast and cuDNN follow the current device
    with determinism(cfg.train.deterministic, device):
        trainer = Trainer(cfg, out_dir)
        return trainer.run(on_epoch_end=on_epoch_end)
