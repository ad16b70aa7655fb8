"""What of a run survives a kill: :class:`Checkpoints` keeps the best epoch and its weights, the
timings and the execution history, writes them with the networks' and optimisers' states to
``checkpoint.pt`` after every epoch, and restores them (and ``best.pt``) when a run resumes.

The best epoch's inference weights ride in the checkpoint because Snakemake deletes an
interrupted job's declared outputs (``best.pt`` among them) before the rerun, and the resumed
epochs need not beat the best one again.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from semibench.config import RunConfig
from semibench.errors import TrainingError, first_line
from semibench.method import Method
from semibench.train.context import EngineContext
from semibench.train.execution import match_state_layouts
from semibench.train.rundir import CHECKPOINT_FORMAT, RunDirectory, check_same_config, read_checkpoint
from semibench.train.validation import MODEL_SELECTION


class Checkpoints:
    """The resumable state of one run beside its networks: ``start_epoch``, ``best``
    (``{"epoch", "val_dice"}``), ``best_model`` (CPU state_dict of the best epoch's inference
    network), ``timings`` and ``execution_history``."""

    def __init__(self, cfg: RunConfig, run_dir: RunDirectory, method: Method, ctx: EngineContext,
                 scaler: torch.amp.GradScaler, device: torch.device):
        self.cfg, self.run_dir, self.method, self.ctx = cfg, run_dir, method, ctx
        self.scaler, self.device = scaler, device
        self.start_epoch = 0
        self.best = {"epoch": -1, "val_dice": -math.inf}
        self.best_model: dict | None = None
        self.timings = {"train_s": 0.0, "val_s": 0.0, "images": 0}
        self.execution_history: list[dict] = []  # the options of each process that trained epochs

    def state(self, epoch: int) -> dict:
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

    def save(self, epoch: int) -> None:
        self.run_dir.save_checkpoint(self.state(epoch))

    def resume(self) -> None:
        """Load the run directory's checkpoint, if any, and put the best epoch back in
        ``best.pt``; before anything is written, so a bad checkpoint changes nothing."""
        if self.run_dir.checkpoint.exists():
            self.load(self.run_dir.checkpoint)
            self.restore_best()

    def load(self, path: Path) -> None:
        state = read_checkpoint(path, self.device)
        check_same_config(state.get("config_items", {}), self.cfg, path)
        saved_opts = state["optimizers"]
        names = self.ctx.optimizer_names
        if isinstance(saved_opts, list):  # written before optimisers had names: registration order
            saved_opts = {(names[i] if i < len(names) else f"#{i}"): o for i, o in enumerate(saved_opts)}
        if sorted(saved_opts) != sorted(names):
            raise TrainingError(f"{path} holds optimiser states {sorted(saved_opts)}, the method has "
                                f"{sorted(names)}; delete {path} to start the run over")
        try:
            self.method.load_state_dict(state["method"])
            for name, opt in self.ctx.named_optimizers().items():
                opt.load_state_dict(saved_opts[name])
            match_state_layouts(self.ctx.optimizers)
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"{path} does not fit this run's method ({first_line(e) or type(e).__name__}); "
                                f"delete it to start the run over") from None
        if state.get("scaler") and self.scaler.is_enabled():  # AMP state only matters on CUDA
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = dict(state["best"])
        self.best_model = state.get("best_model")
        self.timings = dict(state["timings"])
        self.execution_history = list(state.get("execution_history") or [])

    def consider(self, epoch: int, val_dice: float) -> None:
        """A new best epoch: copy its inference weights and write ``best.pt``."""
        if val_dice > self.best["val_dice"]:
            self.best = {"epoch": epoch, "val_dice": val_dice}
            self.best_model = {k: v.detach().to("cpu", copy=True)
                               for k, v in self.method.inference_model().state_dict().items()}
            self.run_dir.write_best(self.best_model, self.best, MODEL_SELECTION, self.cfg)

    def restore_best(self) -> None:
        """Make ``best.pt`` hold the best epoch so far (see the module docstring)."""
        if self.best["epoch"] < 0 or self.run_dir.best_is(self.best["epoch"]):
            return
        if self.best_model is None:
            raise TrainingError(f"{self.run_dir.checkpoint} has no copy of the best epoch "
                                f"({self.best['epoch']}) and {self.run_dir.best} is missing or stale "
                                f"(a checkpoint of an older semibench); delete {self.run_dir.path} to "
                                f"start the run over")
        self.run_dir.write_best(self.best_model, self.best, MODEL_SELECTION, self.cfg)
