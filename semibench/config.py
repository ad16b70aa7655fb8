"""Workflow config loading and the per-run config.

The workflow config (``config/config.yaml``, validated by ``config/schema.json``) is the single
source of defaults besides each method's hyperparameter dataclass. One training run sees a
:class:`RunConfig`: the ``train`` section plus the run's coordinates and its method's
hyperparameters, *resolved*: the dataclass defaults merged with the config's overrides
(:meth:`RunConfig.resolved`), so that files and fingerprints hold every value the run used. In
files (``RunConfig.to_dict``) they sit under ``method_params.<method>``, as in the workflow's
per-job params; fingerprint keys are ``method_params.<method>.<key>``.

Removed keys: ``train.num_workers`` (the data are held in memory as tensors; there never were
loader workers, and the key only made every job re-run and then fail its resume). A config that
still sets it is refused: at the workflow's dry run by the schema ("Additional properties are not
allowed ('num_workers' was unexpected)"), by ``semibench train`` with a line saying to delete
it. A ``config.json`` written by an older version is still read (the key is dropped), so such a
run directory is refused by its differing keys rather than by a traceback.
``train.amp`` was replaced by ``train.precision`` (:mod:`semibench.train.execution`): a config that
sets it is refused with the replacement named; a ``config.json`` that holds it reads as the
precision it meant (true: fp16 autocast on CUDA, false: fp32).

Execution options (``train.precision``, ``channels_last``, ``fused_adam``, ``compile``) say how
a run is computed, not what: like the device they are left out of the fingerprint, so a run
may be resumed under other ones (each process's are recorded in ``train_done.json``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from semibench.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.json"


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Recursive dict update, the way Snakemake merges ``--configfile`` over the defaults."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_workflow_config(paths: list[str | Path]) -> dict:
    """Read and deep-merge YAML/JSON config files in order."""
    cfg: dict = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {p} must hold a mapping")
        cfg = deep_merge(cfg, data)
    return cfg


@dataclass
class TrainConfig:
    """Defaults are the paper's (Sec. 4.1) unless a comment says otherwise."""

    backbone: str = "densenet161"
    weights: str = "imagenet"  # "imagenet" (torchvision cache or download), "none", or a .pth path
    input_size: int = 320
    batch_labeled: int = 8
    batch_unlabeled: int = 8
    epochs: int = 80
    lr: float = 1e-4
    poly_power: float = 0.9
    unsup_start_epoch: int = 5  # 0-based: unsupervised losses from the 6th epoch on
    ema_alpha: float = 0.999
    # execution options (semibench.train.execution): how, not what; outside the fingerprint
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; CUDA only (auto: bf16 where native, else fp16)
    channels_last: bool = True  # CUDA only
    fused_adam: bool = True  # CUDA only
    compile: bool = False  # torch.compile of the DenseUNets (any device)
    iters_per_epoch: int | None = None  # None: one pass over the unlabeled set
    eval_batch_size: int = 8
    deterministic: bool = True
    # overrides of semibench.data.augment.AugmentConfig (the paper gives no magnitudes; ours are there)
    augment: dict[str, Any] = field(default_factory=dict)


# how a run is computed, not what (semibench.train.execution): outside the fingerprint, like the device
EXECUTION_KEYS = ("precision", "channels_last", "fused_adam", "compile")  # train.<key>
LEGACY_EXECUTION_KEYS = ("amp",)  # in fingerprints written before train.precision


def amp_to_precision(amp) -> str:
    """The precision an old ``train.amp`` meant: fp16 autocast on CUDA (true) or fp32 (false)."""
    return "fp16" if amp else "fp32"


REMOVED_TRAIN_KEYS = {
    "num_workers": "train.num_workers was removed (the training data are held in memory; there "
                   "are no loader workers): delete that line from your config",
    "amp": "train.amp was replaced by train.precision: for amp: true write precision: fp16 (the old "
           "fp16 autocast on CUDA) or auto (bf16 where the GPU has it, else fp16), for amp: false "
           "precision: fp32, and delete the amp line",
}


@dataclass
class RunConfig:
    dataset: str
    method: str
    ratio: int
    seed: int
    data_dir: str = "data"
    splits_dir: str = "results/splits"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    train: TrainConfig = field(default_factory=TrainConfig)
    method_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_workflow(cls, cfg: Mapping, dataset: str, method: str, ratio: int, seed: int,
                      device: str = "auto") -> "RunConfig":
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        train_cfg = dict(cfg.get("train", {}))
        removed = sorted(set(train_cfg) & set(REMOVED_TRAIN_KEYS))
        if removed:
            raise ConfigError("; ".join(REMOVED_TRAIN_KEYS[k] for k in removed))
        unknown = sorted(set(train_cfg) - train_keys)
        if unknown:
            raise ConfigError(f"unknown train option(s): {', '.join(unknown)}; known: {', '.join(sorted(train_keys))}")
        from semibench.data.augment import augment_config  # checks train.augment at dry run; imports torch
        augment_config(train_cfg.get("augment"))
        params = dict((cfg.get("method_params") or {}).get(method, {}) or {})
        return cls(dataset=dataset, method=method, ratio=int(ratio), seed=int(seed),
                   data_dir=str(cfg.get("data_dir", "data")),
                   splits_dir=str(cfg.get("splits_dir", "results/splits")), device=device,
                   train=TrainConfig(**train_cfg), method_params=params).resolved()

    def resolved(self) -> "RunConfig":
        """A copy whose ``method_params`` are the method's complete hyperparameters (defaults
        plus these overrides; unknown keys are errors). Idempotent."""
        from semibench.method import resolved_hparams  # the registry imports the methods (and torch)
        from semibench.registry import METHODS
        params = resolved_hparams(METHODS.get(self.method), self.method_params)
        return dataclasses.replace(self, method_params=params)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method_params"] = {self.method: d["method_params"]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        d = dict(d)
        old_train = dict(d.get("train", {}))
        train = {k: v for k, v in old_train.items() if k not in REMOVED_TRAIN_KEYS}
        if "amp" in old_train and "precision" not in old_train:  # written before train.precision
            train["precision"] = amp_to_precision(old_train["amp"])
        d["train"] = TrainConfig(**train)
        params = dict(d.get("method_params") or {})
        if set(params) == {d.get("method")} and isinstance(params[d.get("method")], Mapping):
            params = dict(params[d["method"]])  # {method: {...}}; older files hold the flat dict
        d["method_params"] = params
        return cls(**d)

    def fingerprint_items(self) -> dict:
        """The keys that must match for a checkpoint to be resumed (device and the execution
        options may differ): ``train.<key>``, ``method_params.<method>.<key>`` and the run's
        coordinates."""
        d = self.to_dict()
        d.pop("device")
        for key in EXECUTION_KEYS:
            d["train"].pop(key)
        flat: dict[str, Any] = {}
        for k, v in d.items():
            if k == "method_params":
                for method, params in v.items():
                    flat.update({f"{k}.{method}.{kk}": vv for kk, vv in params.items()})
            elif isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        return flat

    @staticmethod
    def comparable_items(items: dict) -> dict:
        """Saved fingerprint items without the keys that no longer take part: the execution
        options and ``train.amp``, which fingerprints written by older versions hold."""
        drop = {f"train.{k}" for k in EXECUTION_KEYS + LEGACY_EXECUTION_KEYS}
        return {k: v for k, v in items.items() if k not in drop}

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_items(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
