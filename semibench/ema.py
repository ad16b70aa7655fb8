"""Exponential-moving-average (mean) teachers.

``make_teacher(student)`` returns a frozen deep copy that stays in eval mode for good: its
``train()`` is overridden on the instance, so putting the parent :class:`~semibench.method.Method`
in train mode never switches on the teacher's dropout or its BatchNorm batch statistics (one of
the official CDCL release's defects). It is still an instance of the student's class, with the
same attributes and state-dict keys.

``ema_update(teacher, student, alpha)`` after each optimiser step:

- parameters: ``teacher = alpha * teacher + (1 - alpha) * student``;
- floating-point buffers (BatchNorm running mean/var): the same average. The teacher never runs
  in train mode, so it has no statistics of its own; averaging the student's, like its weights,
  keeps them consistent with the averaged weights (the choice of timm's ModelEmaV2);
- integer buffers (``num_batches_tracked``): copied from the student.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

_TEACHER_FLAG = "_semibench_ema_teacher"


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # Ignore the requested mode: a teacher always predicts as at test time.
    return nn.Module.train(self, False)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen, always-eval deep copy of ``student``."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    object.__setattr__(teacher, "train", types.MethodType(_eval_only_train, teacher))
    object.__setattr__(teacher, _TEACHER_FLAG, True)
    return teacher.train()


def is_teacher(module: nn.Module) -> bool:
    return bool(getattr(module, _TEACHER_FLAG, False))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """One EMA step, in place on ``teacher`` (see the module docstring for buffers)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise ValueError("teacher and student have different structures")
    for t, s in zip(t_params, s_params):
        t.mul_(alpha).add_(s.detach() * (1.0 - alpha))
    for t, s in zip(t_bufs, s_bufs):
        if t.is_floating_point():
            t.mul_(alpha).add_(s.detach() * (1.0 - alpha))
        else:
            t.copy_(s)
