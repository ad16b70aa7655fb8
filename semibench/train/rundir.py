"""Every file of one training run, and resuming from them: :class:`RunDirectory`.

    config.json       the run config, written when (re)started
    .host             which host trains it (``semibench status`` on a shared file system)
    train.jsonl       one JSON line per logging interval and per epoch; a resume first drops
                      the lines of the epochs it replays
    checkpoint.pt     after every epoch: method, optimisers, scaler, best so far, fingerprint
    best.pt           the inference network of the best epoch (a copy rides in the checkpoint)
    train_done.json   last: the run's metadata

Every file is written to a temporary sibling and renamed, so none is ever partial. A checkpoint
or finished run written under another config is refused, naming the differing keys.
"""
from __future__ import annotations

import json
import math
import platform
import resource
import sys
from pathlib import Path

import numpy as np
import torch

import semibench
from semibench.atomic import write_atomic, write_json_atomic
from semibench.config import RunConfig
from semibench.errors import TrainingError, describe
from semibench.network.densenet import torchvision_version
from semibench.workflow.status import write_host_file

CHECKPOINT_FORMAT = 2  # 2: carries best_model (format 1 resumes while its best.pt is intact)
CHECKPOINT_KEYS = ("format", "epoch", "method", "optimizers", "best", "timings", "config_items")


def torch_save_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda p: torch.save(obj, p))


def versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision_version(), "numpy": np.__version__,
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


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key (saved → current)`` for every fingerprint key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key} ({a!r} → {b!r})")
    return out


def check_same_config(saved_items: dict, cfg: RunConfig, path: Path) -> None:
    diff = config_differences(RunConfig.comparable_items(saved_items), cfg.fingerprint_items())
    if diff:
        raise TrainingError(f"{path} was written under another config; differing keys: "
                            f"{', '.join(diff)}. Use the original config, or delete {path.parent} "
                            f"to start this run over")


def read_saved_config(path: Path, key: str | None) -> dict | None:
    """Fingerprint items of the config stored in a JSON file (under ``key``), or None."""
    try:
        d = json.loads(path.read_text())
        d = d.get(key) if key else d
        return RunConfig.from_dict(d).fingerprint_items() if isinstance(d, dict) else None
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The state in ``checkpoint.pt``, or one-line :class:`TrainingError` naming the file and what
    to do when it is truncated, corrupt or not a semibench checkpoint (never half-loaded)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path} is truncated or corrupt ({describe(e)}); delete "
                            f"it to restart this run from scratch (the other runs are not affected)") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainingError(f"{path} is not a semibench checkpoint (missing {', '.join(missing)}); "
                            f"delete it to restart this run from scratch")
    return state


def _readable_best(path: Path) -> bool:
    try:
        return isinstance(torch.load(path, map_location="cpu", weights_only=True).get("model"), dict)
    except Exception:
        return False


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.log = self.path / "train.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.best = self.path / "best.pt"
        self.done = self.path / "train_done.json"

    # -- before anything is loaded ------------------------------------------------------------
    def finished(self, cfg: RunConfig) -> bool:
        """True when the run is done under ``cfg`` (and its best.pt is readable); refuses a run
        directory written under another config, before any data is loaded."""
        if self.done.exists():
            saved = read_saved_config(self.done, "config")
            if saved is not None:
                check_same_config(saved, cfg, self.done)
                if _readable_best(self.best) or not self.checkpoint.exists():
                    return True
                # best.pt lost or damaged after the run finished: re-derived from the checkpoint
        if self.checkpoint.exists():
            saved = read_saved_config(self.config, None)
            if saved is not None:
                check_same_config(saved, cfg, self.checkpoint)
        return False

    # -- (re)starting -------------------------------------------------------------------------
    def start(self, cfg: RunConfig, start_epoch: int) -> None:
        """Record the config and host, and drop the log lines of the epochs about to be replayed."""
        write_json_atomic(self.config, cfg.to_dict())
        write_host_file(self.path)
        self.truncate_log(start_epoch)

    def truncate_log(self, start_epoch: int) -> None:
        """Keep only the lines of epochs before ``start_epoch`` (a killed epoch is replayed)."""
        if not self.log.exists():
            return
        keep = []
        for line in self.log.read_text().splitlines():
            try:
                if json.loads(line).get("epoch", math.inf) < start_epoch:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        write_atomic(self.log, "".join(line + "\n" for line in keep))

    def open_log(self) -> "RunLog":
        return RunLog(self.log)

    # -- per epoch ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        torch_save_atomic(self.checkpoint, state)

    def write_best(self, model_state: dict, best: dict, model_selection: str, cfg: RunConfig) -> None:
        torch_save_atomic(self.best, {
            "model": model_state, "epoch": best["epoch"], "val_dice": best["val_dice"],
            "model_selection": model_selection, "config": cfg.to_dict()})

    def best_is(self, epoch: int) -> bool:
        """Whether ``best.pt`` holds a readable model of ``epoch``."""
        if not self.best.exists():
            return False
        try:
            saved = torch.load(self.best, map_location="cpu", weights_only=True)
            return saved.get("epoch") == epoch and isinstance(saved.get("model"), dict)
        except Exception:
            return False  # unreadable: to be rewritten

    def write_done(self, done: dict) -> None:
        write_json_atomic(self.done, done)


class RunLog:
    """``train.jsonl`` open for appending; every line flushed as it is written."""

    def __init__(self, path: Path):
        self._file = open(path, "a")

    def write(self, **record) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
