"""CutMix-Seg (French et al., BMVC 2020): consistency of the student on a box-mixed image with
the equally mixed predictions of an EMA teacher.

Per step, on two independently drawn unlabeled batches x_a and x_b (the engine's
``unlabeled_batches = 2``, ``"single"`` views; pairs are (x_a[i], x_b[i])):

- one box mask M per pair (``semibench.losses.box_masks``): 50 % of the area, random aspect
  ratio, fully inside the image; the box takes image b: x_mix = (1 − M)·x_a + M·x_b;
- the EMA teacher, without gradient, on x_a and on x_b (two passes); its logits mixed with the
  same mask, z_T = (1 − M)·z_a + M·z_b (mixing logits equals mixing probabilities as M is 0/1);
- the student, with gradient, on x_mix;
- c = the fraction of the batch's teacher pixels whose max probability is ≥ 0.97 (one scalar
  for the whole batch, not a per-pixel mask);
- L_u = c · mean over pixels of Σ_c (p_S − p_T)² (summed over classes); L = L_sup + γ·L_u,
  γ = 1, no ramp-up.

Defaults from the official BMVC-era code (``Britefury/cutmix-semisup-seg`` @79ece5a,
``train_seg_semisup_mask_mt.py`` and ``mask_gen.py``):
γ = cons_weight 1.0, conf_thresh 0.97 (batch scalar), mask_prop_range 0.5 with one box, random
aspect ratio and within bounds, teacher α 0.99 on all float state (BN statistics included), no
warm-up, teacher in train mode.

Decisions (where the paper and the official code leave a choice), each with its reason:

- Two independent batches (the release's two loaders), not one batch split in halves (the
  PixelSSL port): each pair mixes two full-size batches, so the student still sees
  ``train.batch_unlabeled`` mixed images per step; the engine counts both batches in img/s.
- Resolution: the shared network already returns its logits bilinearly upsampled to the input
  size, so the mask is drawn, and the mixing and the loss computed, at input resolution (the
  spec's recommended option).
- No colour jitter for the student (the BMVC version; ``--aug_strong_colour`` came in 2021):
  teacher and student see the same augmented images, the engine's ``"single"`` view.
- Valid-pixel mask V ≡ 1: the engine's geometric augmentation pads by reflection, so no pixel
  comes from outside its source image.
- Teacher: as the release, in train mode while training (BN batch statistics of the un-mixed
  batches, dropout on), α 0.99 fixed, BN buffers averaged; hyperparameters ``teacher_mode``,
  ``teacher_average_buffers``, ``ema_warmup`` hold these settings.
- Schedule: the benchmark's engine (Adam, poly LR, epochs, batch, unsup start epoch) instead of
  the release's SGD setting; the loss-specific values above are the release's.
- Evaluation: the student, as every method of the benchmark (the release evaluates the
  teacher); the teacher's val Dice is logged as ``val_dice/teacher``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from semibench.errors import ConfigError, TrainingError
from semibench.losses import box_masks, mix, supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo, ema_teacher_from_hparams
from semibench.registry import register_method


@dataclass
class CutMixHparams:
    cons_weight: float = 1.0  # γ (--cons_weight; REG_MASK_CUTMIX_CW1)
    conf_thresh: float = 0.97  # --conf_thresh; the confidence is one batch scalar
    mask_area: float = 0.5  # --mask_prop_range 0.5: each box covers 50 % of the image
    ema_alpha: float = 0.99  # --teacher_alpha
    ema_warmup: bool = False  # fixed α from the first step
    teacher_mode: str = "train"  # the release runs the teacher in train mode
    teacher_average_buffers: bool = True  # EMAWeightOptimizer averages all float state

    def __post_init__(self):
        if self.cons_weight < 0:
            raise ConfigError(f"cutmix: cons_weight must be >= 0, got {self.cons_weight}")
        if not 0.0 <= self.conf_thresh <= 1.0:
            raise ConfigError(f"cutmix: conf_thresh must be in [0, 1], got {self.conf_thresh}")
        if not 0.0 < self.mask_area <= 1.0:
            raise ConfigError(f"cutmix: mask_area must be in (0, 1], got {self.mask_area}")


def confidence(p_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """c = mean over B, H, W of 1[max_c p_T ≥ threshold]: one scalar for the batch."""
    return (p_t.max(dim=1).values >= threshold).float().mean()


def cutmix_loss(logits_s: torch.Tensor, p_t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """L_u = c · mean over B, H, W of Σ_c (p_S − p_T)², float32, no gradient into p_T or c."""
    p_s = torch.softmax(logits_s.float(), dim=1)
    return c.detach() * (p_s - p_t.detach().float()).pow(2).sum(1).mean()


@register_method("cutmix")
class CutMix(Method):
    display_name = "CutMix"
    report_rank = 40
    in_paper = True
    colour = "#17becf"
    Hparams: ClassVar[type] = CutMixHparams
    unlabeled_views: ClassVar[str | None] = "single"
    unlabeled_batches: ClassVar[int] = 2  # x_a and x_b, drawn independently

    def __init__(self, ctx: MethodContext, hp: CutMixHparams | None = None):
        super().__init__(hp)
        hp = self.hp
        self.student = ctx.build_segmenter()
        self.teacher = ema_teacher_from_hparams(ctx, self.student, hp)
        ctx.add_optimizer(self.student.parameters())

    def pair(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        views = batch.unlabeled_batches()
        if len(views) < 2 or any("image" not in v for v in views[:2]):
            raise TrainingError(f"cutmix needs two unlabeled batches with an 'image' view; the batch "
                                f"has {len(views)} ({', '.join(','.join(v) for v in views)})")
        return views[0]["image"], views[1]["image"]

    def teacher_target(self, x_a: torch.Tensor, x_b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """p_T = softmax((1 − M)·z_a + M·z_b), the teacher on each original image, no gradient."""
        with torch.no_grad():
            z_a = self.teacher(x_a, project=False).logits
            z_b = self.teacher(x_b, project=False).logits
            return torch.softmax(mix(m, z_a.float(), z_b.float()), dim=1)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        L_sup = supervised_loss(self.student, batch)
        if not step.unsup_active:
            return {"loss": L_sup, "L_sup": L_sup.detach()}
        x_a, x_b = self.pair(batch)
        b, _, h, w = x_a.shape
        m = box_masks(b, h, w, self.hp.mask_area, device=x_a.device, dtype=x_a.dtype)
        p_t = self.teacher_target(x_a, x_b, m)
        logits_s = self.student(mix(m, x_a, x_b), project=False).logits
        c = confidence(p_t, self.hp.conf_thresh)
        L_u = cutmix_loss(logits_s, p_t, c)
        return {"loss": L_sup + self.hp.cons_weight * L_u, "L_sup": L_sup.detach(),
                "L_u": L_u.detach(), "conf": c.detach()}

    def extra_validation_models(self) -> dict:
        return {"teacher": self.teacher}
