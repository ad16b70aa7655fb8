"""FixMatch for segmentation (Sohn et al., NeurIPS 2020; the segmentation version of Yang et al.,
CVPR 2023, official code ``LiheYoung/UniMatch`` ``fixmatch.py``): the model's prediction on a
weakly augmented image, where it is confident, is the target of its prediction on a strongly
augmented copy.

Per step, with the unlabeled batch u and a second unlabeled batch, the mix batch (the engine's
``unlabeled_batches = 2``, ``"weak_strong"`` views: x_w geometric only, x_s a photometric copy of
the same x_w, pixel-aligned):

1. pseudo-labels of the mix batch by the model in **eval mode**, without gradient:
   ŷ_mix = argmax, c_mix = max softmax of f(x_w^mix);
2. CutMix: with probability 0.5 a box B (area U(0.02, 0.4) of the image, aspect ratio
   U(0.3, 1/0.3), inside the image) and x_s ← x_s^mix inside B;
3. one train-mode forward of cat(x_l, x_w) (BatchNorm sees the labeled and the weak unlabeled
   images together) and one of x_s; ŷ_w, c_w from f(x_w), detached;
4. targets of x_s: (ŷ_w, c_w) outside B, (ŷ_mix, c_mix) inside;
5. L_x = CE(f(x_l), y_l); L_s = Σ_pixels CE(f(x_s), ŷ) · 1[c ≥ τ] / (number of pixels), the
   masked sum divided by *all* pixels;
6. L = (L_x + λ_u L_s) / 2, τ = 0.95, λ_u = 1. No EMA teacher: the model labels its own weak view.

Defaults: the official code and configs (conf_thresh 0.95, the loss weights, ``obtain_cutmix_box``).

Decisions, each with its reason:

- L_x is the engine's cross-entropy, as for every method in the table, computed on the labeled
  half of the joint forward (the official code's batching).
- Unlabeled loss: CE with the all-pixel normalisation (the natural-image code), because every
  other method here is trained with CE; ``unsup_loss: dice`` gives the medical code's soft Dice
  on the confident pixels instead.
- Views: the engine's weak view (flip, crop, rotation shared with labeled data) and its
  photometric stack for the strong view (colour jitter p 0.8, greyscale p 0.2, blur
  σ ∈ [0.1, 2] p 0.5: the official probabilities; jitter strengths 0.4/0.4/0.4/0.1 instead of
  0.5/0.5/0.5/0.25, the same stack as Mean Teacher's and CDCL's strong views, so the methods differ
  in their losses only). The strong view stays pixel-aligned with the weak one.
- Labeled images get the engine's training augmentation, photometric part included (the
  paper's Sec. 4.1 stack: flip, crop, rotation, blur, colour jitter, greyscale). The official code
  gives them the weak view's geometric augmentation only. A benchmark-wide choice: every method
  in the table trains the same L_sup on the same labeled views, so that two methods differ in
  their unlabeled terms and nothing else; geometric-only labeled views for two methods would
  change their supervised term as well and confound the comparison
  (``train.augment: {labeled_photometric: false}`` gives every method of a run geometric-only
  labeled views).
- The mix batch is an independent draw of the unlabeled set (its own shuffle per epoch). In the
  official code both come from the same loader under a DistributedSampler with the same seed and
  epoch, so the "mix" images are the same images as u, differently augmented; pasting another
  image is what the method describes.
- Every pixel is valid (no ignore mask): the engine's augmentation pads by reflection.
- Box draws: a fixed number of candidates per sample, the first that fits
  (``semibench.losses.cutmix_box_masks``): the official distribution with a fixed-length random
  stream, so runs and resumes are reproducible.
- Before ``train.unsup_start_epoch`` only the engine's L_sup, as for every method; from there the
  full weight (the official code has no ramp-up; the threshold gates the targets).
- Optimiser, lr schedule and batch sizes are the benchmark's (Adam, poly), as for every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from semibench.errors import ConfigError
from semibench.losses import cross_entropy, pseudo_labels, supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo
from semibench.registry import register_method

from ._weak_to_strong import (
    WeakToStrongHparams,
    confident_fraction,
    confident_loss,
    cutmix_strong_view,
    mix_pseudo_labels,
    pasted_targets,
    unlabeled_and_mix,
)


@dataclass
class FixMatchHparams(WeakToStrongHparams):
    unsup_weight: float = 1.0  # λ_u: loss = (L_x + L_s) / 2 (fixmatch.py)

    def __post_init__(self):
        super().__post_init__()
        if self.unsup_weight < 0:
            raise ConfigError(f"fixmatch: unsup_weight must be >= 0, got {self.unsup_weight}")


@register_method("fixmatch")
class FixMatch(Method):
    display_name = "FixMatch"
    report_rank = 100
    in_paper = False
    colour = "#bcbd22"
    Hparams: ClassVar[type] = FixMatchHparams
    unlabeled_views: ClassVar[str | None] = "weak_strong"
    unlabeled_batches: ClassVar[int] = 2  # u and the mix batch

    def __init__(self, ctx: MethodContext, hp: FixMatchHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """L_x and L_s on the graph, and the fraction of confident weak-view pixels."""
        hp, f = self.hp, self.student
        u, mix = unlabeled_and_mix(batch, self.name, ("strong",))
        targets_mix = mix_pseudo_labels(f, mix["weak"])
        x_s, box = cutmix_strong_view(hp, u["strong"], mix["strong"])
        n_l = len(batch.labeled_image)
        logits_x, logits_w = f(torch.cat([batch.labeled_image, u["weak"]]), project=False).logits.split(
            [n_l, len(u["weak"])])
        logits_s = f(x_s, project=False).logits
        targets_w = pseudo_labels(logits_w)
        L_x = cross_entropy(logits_x, batch.labeled_mask)
        L_s = confident_loss(hp, logits_s, pasted_targets(box, targets_w, targets_mix))
        return {"L_x": L_x, "L_s": L_s, "confident": confident_fraction(hp, targets_w[1])}

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        if not step.unsup_active:
            L_sup = supervised_loss(self.student, batch)
            return {"loss": L_sup, "L_sup": L_sup.detach()}
        t = self.losses(batch)
        loss = (t["L_x"] + self.hp.unsup_weight * t["L_s"]) / 2
        return {"loss": loss, "L_sup": t["L_x"].detach(), "L_s": t["L_s"].detach(),
                "confident": t["confident"]}
