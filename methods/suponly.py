"""SupOnly: the lower bound of every table — the segmenter trained on the labeled images alone
with pixel-wise cross-entropy (the paper's L_sup); the unlabeled images are never loaded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from semibench.losses import supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo
from semibench.registry import register_method


@dataclass
class SupOnlyHparams:
    """No hyperparameters: the optimiser and schedule are the engine's (paper Sec. 4.1)."""


@register_method("suponly")
class SupOnly(Method):
    display_name = "SupOnly"
    report_rank = 10
    in_paper = True
    colour = "#7f7f7f"
    Hparams: ClassVar[type] = SupOnlyHparams
    unlabeled_views: ClassVar[str | None] = None  # labeled data only

    def __init__(self, ctx: MethodContext, hp: SupOnlyHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        L_sup = supervised_loss(self.student, batch)
        return {"loss": L_sup, "L_sup": L_sup.detach()}
