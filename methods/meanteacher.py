"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) for segmentation.

- The student sees the *strong* view of each unlabeled image, the EMA teacher the pixel-aligned
  *weak* view (the engine's "weak_strong" views; the same split of views as CDCL, so the two
  differ only in their losses). The engine updates the teacher by EMA (α from the train config).
- L = L_sup + w(t) · L_cons, L_cons = mean over pixels, classes and images of
  (softmax(student) − softmax(teacher))², on the unlabeled images only (as SSL4MIS), and
  w(t) = consistency · exp(−5 (1 − t/T)²) with t the iterations since the unsupervised losses
  started and T = rampup × the iterations from there to the end (``StepInfo.unsup_rampup``;
  SSL4MIS starts its consistency at iteration 0 and ramps over the whole run).
- Before the configured start epoch (``step.unsup_active`` False) only L_sup is computed.

Defaults from SSL4MIS ``code/train_mean_teacher_2D.py`` (HiLab-git/SSL4MIS, Luo et al.), the
widely used segmentation port of the official code: ``--consistency 0.1`` and
``--consistency_rampup 200`` in units of 150 iterations, i.e. the whole 30,000-iteration run.
The paper gives no values for its competitors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from semibench.errors import ConfigError
from semibench.losses import softmax_mse, supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo
from semibench.registry import register_method


@dataclass
class MeanTeacherHparams:
    consistency: float = 0.1  # final weight of L_cons (SSL4MIS --consistency)
    rampup: float = 1.0  # ramp-up length / the unsupervised iterations (SSL4MIS: the whole run)

    def __post_init__(self):
        if self.consistency < 0 or self.rampup < 0:
            raise ConfigError(f"meanteacher: consistency and rampup must be >= 0, got {self}")


@register_method("meanteacher")
class MeanTeacher(Method):
    display_name = "MeanTeacher"
    report_rank = 20
    in_paper = False  # the framework CDCL builds on, but no row of its Tables 1-2: no paper numbers
    colour = "#1f77b4"
    Hparams: ClassVar[type] = MeanTeacherHparams
    unlabeled_views: ClassVar[str | None] = "weak_strong"

    def __init__(self, ctx: MethodContext, hp: MeanTeacherHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        self.teacher = ctx.ema_of(self.student)
        ctx.add_optimizer(self.student.parameters())

    def consistency_weight(self, step: StepInfo) -> float:
        return self.hp.consistency * step.unsup_rampup(self.hp.rampup)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        L_sup = supervised_loss(self.student, batch)
        if not step.unsup_active:
            return {"loss": L_sup, "L_sup": L_sup.detach()}
        logits_s = self.student(batch.unlabeled["strong"], project=False).logits
        with torch.no_grad():
            logits_t = self.teacher(batch.unlabeled["weak"], project=False).logits
        L_cons = softmax_mse(logits_s, logits_t)
        w = self.consistency_weight(step)
        loss = L_sup + w * L_cons
        return {"loss": loss, "L_sup": L_sup.detach(), "L_cons": L_cons.detach(),
                "w_cons": L_sup.new_tensor(w)}
