"""Exponential-moving-average (mean) teachers, with per-method settings.

``make_teacher(student, mode)`` returns a frozen deep copy (no parameter requires grad). It is
still an instance of the student's class, with the same attributes and state-dict keys.

- ``mode="eval"`` (the default): the copy stays in eval mode for good; its ``train()`` is
  overridden on the instance, so putting the parent :class:`~semibench.method.Method` in train
  mode never switches on the teacher's dropout or its BatchNorm batch statistics.
- ``mode="train"``: the copy follows its parent's mode like any submodule: in train mode while
  the method trains (BN batch statistics, dropout on, its own BN running statistics updated by
  its forward passes), in eval mode when evaluated. The originals of TCSMv2 and CutMix-Seg run
  their teachers this way.

``ema_update(teacher, student, alpha, average_buffers)`` after each optimiser step:

- parameters: ``teacher = alpha * teacher + (1 - alpha) * student``;
- with ``average_buffers`` (the default) floating-point buffers (BatchNorm running mean/var) get
  the same average and integer buffers (``num_batches_tracked``) are copied from the student:
  an eval-mode teacher has no statistics of its own, and averaging the student's keeps them
  consistent with the averaged weights (timm's ModelEmaV2; CutMix-Seg's ``EMAWeightOptimizer``);
- without it the buffers are left alone (parameters only, as TCSM and CDCL's releases): only
  meaningful for a train-mode teacher, whose forward passes keep its own statistics.

:class:`TeacherSettings` bundles these with the α warm-up ``min(1 − 1/(t+1), α)`` of Tarvainen
& Valpola's code (t = the 0-based global iteration of the optimiser step just taken).
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from torch import nn

from semibench.errors import ConfigError

_TEACHER_FLAG = "_semibench_ema_teacher"
TEACHER_MODES = ("eval", "train")


@dataclass(frozen=True)
class TeacherSettings:
    """How one EMA teacher is kept (see the module docstring)."""

    alpha: float
    average_buffers: bool = True
    warmup: bool = False  # α_t = min(1 − 1/(t+1), α)
    mode: str = "eval"  # "eval": always eval; "train": follows the parent's mode

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"EMA alpha must be in [0, 1], got {self.alpha}")
        if self.mode not in TEACHER_MODES:
            raise ConfigError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}, got {self.mode!r}")
        if self.mode == "eval" and not self.average_buffers:
            raise ConfigError("an eval-mode teacher must average the student's buffers: it never "
                              "computes BatchNorm statistics itself, so they would stay at their "
                              "initial values")

    def alpha_at(self, t: int) -> float:
        """α for the EMA step after global iteration ``t`` (0-based)."""
        return min(1.0 - 1.0 / (t + 1), self.alpha) if self.warmup else self.alpha


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # Ignore the requested mode: a teacher always predicts as at test time.
    return nn.Module.train(self, False)


def make_teacher(student: nn.Module, mode: str = "eval") -> nn.Module:
    """A frozen deep copy of ``student``: always in eval mode (``"eval"``) or following its
    parent's mode (``"train"``)."""
    if mode not in TEACHER_MODES:
        raise ConfigError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    object.__setattr__(teacher, _TEACHER_FLAG, True)
    if mode == "train":
        return teacher.train(student.training)
    object.__setattr__(teacher, "train", types.MethodType(_eval_only_train, teacher))
    return teacher.train()


def is_teacher(module: nn.Module) -> bool:
    return bool(getattr(module, _TEACHER_FLAG, False))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, average_buffers: bool = True) -> None:
    """One EMA step, in place on ``teacher`` (see the module docstring for buffers)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise ValueError("teacher and student have different structures")
    floats = [(t, s) for t, s in zip(t_bufs, s_bufs) if t.is_floating_point()] if average_buffers else []
    _average([t for t in t_params] + [t for t, _ in floats],
             [s.detach() for s in s_params] + [s.detach() for _, s in floats], alpha)
    if average_buffers:
        for t, s in zip(t_bufs, s_bufs):
            if not t.is_floating_point():
                t.copy_(s)


def _average(teacher: list[torch.Tensor], student: list[torch.Tensor], alpha: float) -> None:
    """``t = t * alpha + s * (1 - alpha)`` for every pair: the per-tensor operations, batched
    into a few multi-tensor kernels on a GPU (a DenseNet-161 has ~1500 tensors, and one launch
    per tensor and operation made the update launch-bound); the same arithmetic, in the same
    order, so the CPU result is unchanged bit for bit."""
    if not teacher:
        return
    torch._foreach_mul_(teacher, alpha)
    torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - alpha))
