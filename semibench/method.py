"""The method plugin API. A method is one file in ``methods/``: a hyperparameter dataclass with
the paper's defaults and a :class:`Method` subclass whose :meth:`Method.training_step` returns
the paper's named losses. The engine owns everything else: loaders, optimisers' schedule, AMP,
EMA updates, checkpoints, validation, logging.

How the planned methods fit:
- several networks / optimisers (GCT: two segmenters + a flaw detector): call
  ``ctx.build_segmenter()`` / ``ctx.add_optimizer(params, name=...)`` as often as needed in
  ``__init__`` (see *Update steps* below).
- auxiliary decoders on perturbed features (CCT): plain submodules of the method reading
  ``SegOutput.features``; give them to ``ctx.add_optimizer``.
- an EMA teacher: ``self.teacher = ctx.ema_of(self.student)``; the engine updates it after each
  optimiser step. Per-method teacher settings (keyword arguments of ``ema_of``, see
  :mod:`semibench.train.ema`): ``alpha`` (default the run's ``train.ema_alpha``), ``average_buffers``
  (True: BN running statistics averaged like the weights; False: parameters only),
  ``warmup`` (α_t = min(1 − 1/(t+1), α), t the 0-based global iteration) and ``mode``
  (``"eval"``: the teacher always predicts as at test time; ``"train"``: it follows the method's
  mode, BN batch statistics and dropout on while training, as in TCSMv2's and CutMix-Seg's
  code). The defaults (run alpha, buffers averaged, no warm-up, eval) are Mean Teacher's and
  CDCL's.
- several unlabeled batches (CutMix-Seg mixes pairs of images): the class attribute
  ``unlabeled_batches = n`` asks for n independently drawn unlabeled batches of
  ``train.batch_unlabeled`` images each. ``batch.unlabeled`` holds the views of the first,
  ``batch.more_unlabeled`` those of the others (``batch.unlabeled_batches()``: all n). Batch 0 is
  the one every method gets; batch j ≥ 1 is drawn from its own sample stream (its own shuffle of
  the unlabeled set per epoch) with its own augmentation generator, each a function of (seed,
  epoch, iteration, j), so runs and resumes stay reproducible. The img/s and the images counted
  in ``train_done.json`` include all n batches.
- method-specific unlabeled views: the class attribute ``unlabeled_views`` names a view kind
  built by ``semibench.data.augment`` (``"weak_strong"``: pixel-aligned weak and strong views, with
  ``view_options = {"strong_views": n}`` n independent strong views ``strong``, ``strong_2``, …;
  ``"single"``; ``"two_crops"``: two overlapping crops, their flips and overlap boxes).
  ``view_options`` passes keyword options to the view kind (CAC: ``{"stride": 8, "iou": (0.1,
  1.0)}``: crop offsets and overlap boxes on the projector's 1/8 grid). Geometric
  transforms that must be inverted (TCSMv2) are applied by the method on tensors. The engine
  checks ``unlabeled_views``, ``view_options`` and ``unlabeled_batches`` once, when it builds
  the method (:mod:`semibench.contract`), and the batch holds exactly the kind's views, so a
  method does not check them.
- shared loss pieces (cross-entropy, softmax-MSE, invertible flip/rot90, CutMix boxes and
  pasting, weak-view pseudo-labels and confident-pixel losses) live in :mod:`semibench.losses`;
  a method imports them rather than writing its own copy.
- a CutMix of two unlabeled batches (FixMatch, UniMatch): ``unlabeled_batches = 2``, then
  ``losses.cutmix_box_masks`` and ``losses.paste`` put batch 1's strong view into batch 0's
  inside each box, and the same boxes paste the targets.
- predictions as at test time in the middle of a step (FixMatch's and UniMatch's pseudo-labels
  of the mix batch): ``with predicting(net):`` runs ``net`` in eval mode (BatchNorm running
  statistics, no dropout, no update of the statistics) without gradient, and restores its mode.
- an extra training-mode pass that must not move the statistics used at test time (CAC's
  classifier on pooled 1/8 features): ``with batch_statistics_only(net):`` normalises with the
  batch's statistics and leaves the BatchNorm running statistics as they were.
- feature perturbation (UniMatch): ``net(x, feature_dropout=p)`` of a segmenter also returns
  ``fp_logits``, the decoder's output on channel-dropped encoder features, decoded in one batch
  with the clean ones (:class:`semibench.network.model.DenseUNet`).
- resolved hyperparameters: every run records its method's *complete* hyperparameters (the
  dataclass defaults merged with the config's overrides, :func:`resolved_hparams`) in
  ``config.json``, the resume fingerprint, ``train_done.json``/``metrics.json`` meta and the
  workflow's per-job params, under ``method_params.<method>``. Editing a default in a method
  file therefore re-runs exactly that method's jobs, and a resume across the edit is refused
  naming the key (``method_params.<method>.<key>``).
- ramp-ups of unsupervised weights: ``step.unsup_rampup(fraction)`` starts the Gaussian ramp
  where the engine starts the unsupervised losses (``train.unsup_start_epoch``), over
  ``fraction`` of the remaining iterations (Mean Teacher, TCSMv2, CCT, GCT). CDCL's w_cons grows
  with the epoch over the whole run, as its paper says (``step.progress``).
- several validated networks (GCT's two task models): :meth:`Method.extra_validation_models`
  names the networks besides :meth:`Method.inference_model` whose validation Dice the engine
  also logs (``val_dice/<name>`` in the ``"epoch"`` lines of ``train.jsonl``); model selection
  and ``best.pt`` stay with ``inference_model()``.

Update steps (:class:`semibench.train.update.Update`). ``ctx.add_optimizer(params, name="main",
**adam_options)`` registers a named Adam (default lr: the run's ``train.lr``; a method may pass
its own ``lr``, ``betas``, ...). Every optimiser is poly-scheduled from its own initial lr and
checkpointed under its name; a method never zeroes, steps or schedules one itself, and an
optimiser it builds outside ``ctx.add_optimizer`` is refused; names are unique and no
parameter belongs to two optimisers. ``training_step`` returns either

- ``{"loss": total, ...}``: one backward of ``total`` into every parameter, or
- ``{"loss/<name>": loss, ...}``, one entry per optimiser it trains this step (no ``"loss"``):
  each loss is back-propagated into *its optimiser's parameters only*
  (``backward(inputs=...)``), in the order of the returned dict. This is how a method trains
  parts on different objectives with the others frozen (GCT: ``loss/task_l`` and
  ``loss/task_r`` reach the task models through the flaw detector without changing it,
  ``loss/flaw`` reaches the flaw detector only). The engine logs their sum as ``"loss"``.
  An optimiser without an entry (or whose loss has no gradient) is not stepped that step.

Per step the engine then (1) zeroes every optimiser, (2) runs the backward pass(es), AMP-scaled,
(3) steps, in registration order, each optimiser that received a gradient (one with none is
skipped: Adam would not move, and under CUDA AMP ``GradScaler.step`` refuses it), (4) calls
``scaler.update()`` once, (5) updates the EMA teachers. All backward passes precede all steps;
since every forward of the step ran in ``training_step``, this equals stepping each optimiser
right after its own backward. A method that needs a forward pass *after* another part was
stepped within the same iteration (alternating updates) is not expressible; GCT is not such a
method (its targets come from the step's first, pre-update predictions).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

from semibench.errors import ConfigError
from semibench.train.schedules import gaussian_rampup


@dataclass
class Batch:
    """One training step's data, already on the device and normalised."""

    labeled_image: torch.Tensor  # (B, 3, H, W) float
    labeled_mask: torch.Tensor  # (B, H, W) long, 0 = background, 1 = nucleus
    unlabeled: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's view kind
    # the views of unlabeled batches 1..n-1 for a method with ``unlabeled_batches = n``
    more_unlabeled: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def unlabeled_batches(self) -> list[dict[str, torch.Tensor]]:
        """The views of every unlabeled batch of the step, batch 0 first."""
        return [self.unlabeled, *self.more_unlabeled]


@dataclass
class StepInfo:
    """Where training stands, for schedules inside a method."""

    epoch: int  # 0-based
    epochs: int
    iteration: int  # global, 0-based
    iterations: int  # total over the run
    unsup_active: bool  # False before the configured start epoch of unsupervised losses
    unsup_start_iteration: int = 0  # the first iteration with unsup_active (train.unsup_start_epoch)

    @property
    def progress(self) -> float:
        """Fraction of the epochs done, in [0, 1], for epoch-wise ramp-ups."""
        return self.epoch / max(1, self.epochs - 1) if self.epochs > 1 else 1.0

    def unsup_rampup(self, fraction: float) -> float:
        """The Gaussian ramp-up exp(−5(1 − t/T)²) of an unsupervised weight, started where the
        unsupervised losses start: t = iterations since ``unsup_start_iteration``, T = ``fraction``
        of the iterations from there to the end. The originals start their unsupervised term at
        iteration 0, so their "ramp over x % of training" is this; a ramp counted from iteration 0
        would be partly or wholly spent behind the engine's start gate, and the weight would jump
        there (CCT's 30 after 10 %, GCT's 100 after 5/45)."""
        span = max(0, self.iterations - self.unsup_start_iteration)
        return gaussian_rampup(self.iteration - self.unsup_start_iteration, fraction * span)


class MethodContext:
    """What the engine offers a method while it is built. Implemented by the engine."""

    device: torch.device

    def build_segmenter(self, **model_options) -> nn.Module:
        """A fresh DenseUNet from the run's model config; ``model_options`` (num_classes,
        proj_dim, proj_pool) are for a method whose heads need other settings."""
        raise NotImplementedError

    def ema_of(self, module: nn.Module) -> nn.Module:  # frozen copy updated by EMA each step
        raise NotImplementedError

    def add_optimizer(self, params, name: str = "main", **adam_options) -> torch.optim.Optimizer:
        """A named Adam (options as ``torch.optim.Adam``'s; lr default ``train.lr``) that the
        engine schedules, steps and checkpoints (see *Update steps*)."""
        raise NotImplementedError


class Method(nn.Module):
    """Base class. Subclasses set ``Hparams`` and ``unlabeled_views``, implement
    ``__init__(ctx, hp)`` (calling ``super().__init__(hp)``) and ``training_step``, and are
    registered with ``@register_method("name")``, which also sets ``name``. The engine checks
    the contract once, when it builds the method (:mod:`semibench.contract`); ``semibench
    check-method NAME`` runs a method through a few steps, a resume and an evaluation."""

    name: ClassVar[str] = ""  # set by register_method
    Hparams: ClassVar[type] = type(None)
    unlabeled_views: ClassVar[str | None] = "weak_strong"  # None: labeled data only
    view_options: ClassVar[dict] = {}  # keyword options of the view kind, e.g. two_crops' stride
    fixed_ratio: ClassVar[int | None] = None  # e.g. FullSup trains with every train sample labeled
    unlabeled_batches: ClassVar[int] = 1  # independently drawn unlabeled batches per step
    # How the report shows the method (read from the class body without importing it, as
    # ``fixed_ratio``): its name in tables and figures (default: the registry name); its place,
    # rows sorted by rank then as given (the paper's rows 10-90, CDCL 90, later baselines 100+,
    # FullSup last; the default sits just before CDCL); whether the CDCL paper's Tables 1-2 have
    # a row for it (else the tables mark it "*": no paper numbers to compare with); a fixed
    # colour (default: a shared palette's next).
    display_name: ClassVar[str | None] = None
    report_rank: ClassVar[int] = 89
    in_paper: ClassVar[bool] = False
    colour: ClassVar[str | None] = None

    def __init__(self, hp: Any = None):
        """``self.hp``: the engine's resolved hyperparameters, or the dataclass defaults when a
        test builds the method without them (None for a method without ``Hparams``)."""
        super().__init__()
        if hp is None and dataclasses.is_dataclass(self.Hparams):
            hp = self.Hparams()
        self.hp = hp

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        """Return named losses; ``"loss"`` is the total that the engine back-propagates."""
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        """The network evaluated on val/test (the student unless the paper says otherwise)."""
        return self.student

    def extra_validation_models(self) -> dict[str, nn.Module]:
        """Networks besides ``inference_model()`` whose validation Dice is logged each epoch as
        ``val_dice/<name>`` (GCT: both task models). Not used for model selection."""
        return {}


@contextmanager
def predicting(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode and without gradient for the block, then back in its previous mode:
    predictions as at test time (BatchNorm running statistics, left unchanged; no dropout)."""
    was_training = net.training
    net.train(False)
    try:
        with torch.no_grad():
            yield net
    finally:
        net.train(was_training)


@contextmanager
def batch_statistics_only(net: nn.Module) -> Iterator[nn.Module]:
    """``net``'s BatchNorm layers normalise with the batch's statistics (as in training) but leave
    their running statistics, used at test time, unchanged for the block: for an extra pass on
    inputs unlike the test inputs (CAC's classifier on pooled 1/8 features)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 − 0)·running + 0·batch: exactly unchanged
    try:
        yield net
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def make_hparams(cls: type, overrides: Mapping[str, Any] | None) -> Any:
    """Build ``cls`` (a dataclass) from defaults plus config overrides; unknown keys are errors."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown hyperparameter(s) for {cls.__qualname__}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return cls(**overrides)


def _has_hparams(method_cls: type) -> bool:
    hp = getattr(method_cls, "Hparams", None)
    return hp is not None and hp is not type(None)


def resolved_hparams(method_cls: type, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's complete hyperparameters: ``dataclasses.asdict`` of its ``Hparams`` built
    from the defaults plus ``overrides`` (checked by :func:`make_hparams`); ``{}`` for a method
    without hyperparameters (which then refuses any override)."""
    if not _has_hparams(method_cls):
        if overrides:
            raise ConfigError(f"method {getattr(method_cls, 'name', method_cls.__name__)!r} takes no "
                              f"hyperparameters, got {', '.join(sorted(overrides))}")
        return {}
    return dataclasses.asdict(make_hparams(method_cls.Hparams, overrides))


def check_method_class(method_cls: type, view_kinds) -> None:
    """The engine's one check of what a method declares: ``unlabeled_views`` is None or a known
    view kind, ``unlabeled_batches`` a positive integer."""
    name = getattr(method_cls, "name", "") or method_cls.__name__
    views = getattr(method_cls, "unlabeled_views", None)
    if views is not None and views not in view_kinds:
        raise ConfigError(f"method {name!r} declares unlabeled_views={views!r}, not a view kind; "
                          f"known: {', '.join(sorted(view_kinds))} (or None: labeled data only)")
    n = getattr(method_cls, "unlabeled_batches", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"method {name!r} declares unlabeled_batches={n!r}; it must be an integer >= 1")
    if views is None and n != 1:
        raise ConfigError(f"method {name!r} declares unlabeled_batches={n} but no unlabeled_views")


def ema_teacher_from_hparams(ctx: MethodContext, student: nn.Module, hp: Any) -> nn.Module:
    """The EMA teacher of ``student`` with the settings a method keeps in its hyperparameters
    (``ema_alpha``, ``ema_warmup``, ``teacher_average_buffers``, ``teacher_mode``), for methods
    whose original code fixes its own teacher (TCSMv2, CutMix)."""
    return ctx.ema_of(student, alpha=hp.ema_alpha, warmup=hp.ema_warmup,
                      average_buffers=hp.teacher_average_buffers, mode=hp.teacher_mode)
