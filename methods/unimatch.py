"""UniMatch (Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation", CVPR 2023; official code ``LiheYoung/UniMatch`` ``unimatch.py`` and
``more-scenarios/medical/unimatch.py``): FixMatch with two strong views of each image and a
second, feature-level perturbation stream.

Per step, with the unlabeled batch u and a second unlabeled batch, the mix batch (the engine's
``unlabeled_batches = 2``, ``"weak_strong"`` views with ``strong_views = 2``: x_w geometric only,
x_s1 and x_s2 two independent photometric copies of the same x_w, pixel-aligned with it):

1. pseudo-labels of the mix batch by the model in **eval mode**, without gradient:
   ŷ_mix = argmax, c_mix = max softmax of f(x_w^mix);
2. CutMix, per strong view k ∈ {1, 2}: with probability 0.5 a box B_k (area U(0.02, 0.4),
   aspect ratio U(0.3, 1/0.3), inside the image) and x_sk ← x_sk^mix inside B_k;
3. one train-mode forward of cat(x_l, x_w) with **feature perturbation**: the encoder runs once,
   the decoder decodes the clean encoder outputs and their Dropout2d(0.5) copies in one batch,
   giving f(x_l), f(x_w) and f_fp(x_w); ŷ_w, c_w from f(x_w), detached;
4. one train-mode forward of cat(x_s1, x_s2);
5. targets of x_sk: (ŷ_w, c_w) outside B_k, (ŷ_mix, c_mix) inside;
6. L_x = CE(f(x_l), y_l); L_s1, L_s2 = Σ_pixels CE(f(x_sk), ŷ) · 1[c ≥ τ] / (number of pixels);
   L_fp = the same loss of f_fp(x_w) against (ŷ_w, c_w);
7. L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, τ = 0.95. No EMA teacher.

Defaults: the official code and configs (conf_thresh 0.95, the loss weights, Dropout2d 0.5,
``obtain_cutmix_box``).

Decisions, each with its reason:

- Where the features are dropped: on every encoder output the DenseUNet's decoder receives (the
  four skips and the bottleneck), channel-wise with p = 0.5: the medical U-Net variant's "every
  encoder feature" (the natural-image variant drops DeepLabv3+'s low- and high-level features,
  all its decoder gets). The dropout is on in the perturbed half only
  (``DenseUNet.forward(x, feature_dropout=0.5)``).
- L_x is the engine's cross-entropy, as for every method in the table, computed on the labeled
  part of the joint forward (the official code's batching; the medical code's (CE + Dice) / 2 is
  not used, so every method shares one supervised loss).
- Unlabeled losses: CE with the all-pixel normalisation (the natural-image code), because every
  other method here is trained with CE; ``unsup_loss: dice`` gives the medical code's soft Dice
  on the confident pixels for all three terms.
- Views: the engine's weak view and two independent draws of its photometric stack (colour
  jitter p 0.8, greyscale p 0.2, blur σ ∈ [0.1, 2] p 0.5: the official probabilities; jitter
  strengths 0.4/0.4/0.4/0.1 instead of 0.5/0.5/0.5/0.25, the stack Mean Teacher and CDCL use).
- Labeled images get the engine's training augmentation, photometric part included (the
  paper's Sec. 4.1 stack: flip, crop, rotation, blur, colour jitter, greyscale). The official code
  gives them the weak view's geometric augmentation only. A benchmark-wide choice: every method
  in the table trains the same L_sup on the same labeled views, so that two methods differ in
  their unlabeled terms and nothing else; geometric-only labeled views for two methods would
  change their supervised term as well and confound the comparison
  (``train.augment: {labeled_photometric: false}`` gives every method of a run geometric-only
  labeled views).
- The mix batch is an independent draw of the unlabeled set (its own shuffle per epoch), as in
  the official medical code, whose mix loader is a second sampler over the unlabeled set shuffled
  for another epoch (``set_epoch(epoch + epochs)``), so it pastes other images. In the official
  natural-image code the mix loader's sampler has u's seed and epoch, so its images are u's own
  images, differently augmented; pasting another image is what the method describes.
- Every pixel is valid (no ignore mask): the engine's augmentation pads by reflection.
- Box draws: a fixed number of candidates per sample, the first that fits (the official
  distribution with a fixed-length random stream, for reproducible runs and resumes).
- Before ``train.unsup_start_epoch`` only the engine's L_sup, as for every method; from there the
  full weights (the official code has no ramp-up; the threshold gates the targets).
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
class UniMatchHparams(WeakToStrongHparams):
    strong_weight: float = 0.25  # of each of L_s1, L_s2 (unimatch.py: loss_u_s1 * 0.25 + loss_u_s2 * 0.25)
    fp_weight: float = 0.5  # of L_fp (loss_u_w_fp * 0.5)
    fp_dropout: float = 0.5  # nn.Dropout2d(0.5) on the encoder features (need_fp)

    def __post_init__(self):
        super().__post_init__()
        if self.strong_weight < 0 or self.fp_weight < 0:
            raise ConfigError(f"unimatch: strong_weight and fp_weight must be >= 0, got "
                              f"{self.strong_weight}, {self.fp_weight}")
        if not 0.0 < self.fp_dropout < 1.0:
            raise ConfigError(f"unimatch: fp_dropout must be in (0, 1), got {self.fp_dropout}")


@register_method("unimatch")
class UniMatch(Method):
    display_name = "UniMatch"
    report_rank = 110
    in_paper = False
    colour = "#393b79"
    Hparams: ClassVar[type] = UniMatchHparams
    unlabeled_views: ClassVar[str | None] = "weak_strong"
    view_options: ClassVar[dict] = {"strong_views": 2}  # x_s1 = "strong", x_s2 = "strong_2"
    unlabeled_batches: ClassVar[int] = 2  # u and the mix batch

    def __init__(self, ctx: MethodContext, hp: UniMatchHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """L_x, L_s1, L_s2 and L_fp on the graph, and the fraction of confident weak pixels."""
        hp, f = self.hp, self.student
        u, mix = unlabeled_and_mix(batch, self.name, ("strong", "strong_2"))
        targets_mix = mix_pseudo_labels(f, mix["weak"])
        x_s1, box1 = cutmix_strong_view(hp, u["strong"], mix["strong"])
        x_s2, box2 = cutmix_strong_view(hp, u["strong_2"], mix["strong_2"])
        n_l, n_u = len(batch.labeled_image), len(u["weak"])
        out = f(torch.cat([batch.labeled_image, u["weak"]]), project=False, feature_dropout=hp.fp_dropout)
        logits_x, logits_w = out.logits.split([n_l, n_u])
        logits_fp = out.fp_logits[n_l:]
        logits_s1, logits_s2 = f(torch.cat([x_s1, x_s2]), project=False).logits.chunk(2)
        targets_w = pseudo_labels(logits_w)
        return {
            "L_x": cross_entropy(logits_x, batch.labeled_mask),
            "L_s1": confident_loss(hp, logits_s1, pasted_targets(box1, targets_w, targets_mix)),
            "L_s2": confident_loss(hp, logits_s2, pasted_targets(box2, targets_w, targets_mix)),
            "L_fp": confident_loss(hp, logits_fp, targets_w),
            "confident": confident_fraction(hp, targets_w[1]),
        }

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        if not step.unsup_active:
            L_sup = supervised_loss(self.student, batch)
            return {"loss": L_sup, "L_sup": L_sup.detach()}
        t = self.losses(batch)
        hp = self.hp
        loss = (t["L_x"] + hp.strong_weight * (t["L_s1"] + t["L_s2"]) + hp.fp_weight * t["L_fp"]) / 2
        return {"loss": loss, "L_sup": t["L_x"].detach(), "L_s1": t["L_s1"].detach(),
                "L_s2": t["L_s2"].detach(), "L_fp": t["L_fp"].detach(), "confident": t["confident"]}
