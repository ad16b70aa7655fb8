"""The method plugin API. A method is one file in ``methods/``: a hyperparameter dataclass with
the paper's defaults and a :class:`Method` subclass whose :meth:`Method.training_step` returns
the paper's named losses. The engine owns everything else: loaders, optimisers' schedule, AMP,
EMA updates, checkpoints, validation, logging.

How the planned methods fit:
- several networks / optimisers (GCT: two segmenters + a flaw detector): call
  ``ctx.build_segmenter()`` / ``ctx.add_optimizer(params)`` as often as needed in ``__init__``;
  the engine schedules and steps every registered optimiser after the backward of ``"loss"``.
- auxiliary decoders on perturbed features (CCT): plain submodules of the method reading
  ``SegOutput.features``; give them to ``ctx.add_optimizer``.
- an EMA teacher: ``self.teacher = ctx.ema_of(self.student)``; the engine updates it after each
  optimiser step with the configured alpha.
- method-specific unlabeled views: the class attribute ``unlabeled_views`` names a view kind
  built by ``semibench.augment`` (``"weak_strong"``: pixel-aligned weak and strong views;
  ``"single"``; ``"two_crops"``: two overlapping crops and their overlap boxes). Geometric
  transforms that must be inverted (TCSMv2) are applied by the method on tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .errors import ConfigError


@dataclass
class Batch:
    """One training step's data, already on the device and normalised."""

    labeled_image: torch.Tensor  # (B, 3, H, W) float
    labeled_mask: torch.Tensor  # (B, H, W) long, 0 = background, 1 = nucleus
    unlabeled: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's view kind


@dataclass
class StepInfo:
    """Where training stands, for schedules inside a method."""

    epoch: int  # 0-based
    epochs: int
    iteration: int  # global, 0-based
    iterations: int  # total over the run
    unsup_active: bool  # False before the configured start epoch of unsupervised losses

    @property
    def progress(self) -> float:
        """Fraction of the epochs done, in [0, 1], for epoch-wise ramp-ups."""
        return self.epoch / max(1, self.epochs - 1) if self.epochs > 1 else 1.0


class MethodContext:
    """What the engine offers a method while it is built. Implemented by the engine."""

    device: torch.device

    def build_segmenter(self) -> nn.Module:  # a fresh DenseUNet from the run's model config
        raise NotImplementedError

    def ema_of(self, module: nn.Module) -> nn.Module:  # frozen copy updated by EMA each step
        raise NotImplementedError

    def add_optimizer(self, params) -> torch.optim.Optimizer:  # Adam, scheduled by the engine
        raise NotImplementedError


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``Hparams`` and ``unlabeled_views`` and implement
    ``__init__(ctx, hp)`` and ``training_step``."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = type(None)
    unlabeled_views: ClassVar[str | None] = "weak_strong"  # None: labeled data only
    fixed_ratio: ClassVar[int | None] = None  # e.g. FullSup trains with every train sample labeled

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        """Return named losses; ``"loss"`` is the total that the engine back-propagates."""
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        """The network evaluated on val/test (the student unless the paper says otherwise)."""
        return self.student


def make_hparams(cls: type, overrides: Mapping[str, Any] | None) -> Any:
    """Build ``cls`` (a dataclass) from defaults plus config overrides; unknown keys are errors."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown hyperparameter(s) for {cls.__qualname__}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return cls(**overrides)
