"""CAC: Directional Context-aware Consistency (Lai et al., CVPR 2021), after the official
``dvlab-research/Context-Aware-Consistency``.

One network (the shared DenseUNet: extractor at 1/4, classifier, projector at 1/8), no teacher.
Per step, besides L_s = CE on the labeled batch:

- two crops of each unlabeled image (the engine's ``"two_crops"`` views with ``stride`` 8 and
  IoU in [0.1, 1.0], see :func:`semibench.data.augment.sample_crop_pair`), each with its own flips
  and photometric changes;
- per crop: f = avg-pool₂(extractor) (1/8), z = normalize(projector(features)) (1/8), and
  pseudo-labels ŷ and confidences κ from the classifier run on f (the pooled 1/8 features,
  dropout active as in training), detached;
- z, ŷ, κ are flipped back (:func:`semibench.data.augment.undo_flips`) and the overlap boxes,
  multiples of 8, sliced at ``box // 8`` (:func:`overlap`): aligned anchors o1, o2;
- negatives: ``selected_frac`` · B·h·w positions per view, drawn without replacement from the
  whole 1/8 maps, detached, pushed into a bank that keeps the last ``step_save + 1`` steps;
- directional InfoNCE (:func:`directional_nce`): ℓ1 = −log(e^{o1·sg(o2)/τ} / (e^{o1·sg(o2)/τ} +
  Σ_n 1[ŷ_n ≠ ŷ1]·e^{o1·z_n/τ})), averaged over the anchors of m1 = 1[κ2 > γ ∧ κ1 < κ2]
  (:func:`directional_masks`); ℓ2 mirrors it; L = L_s + λ·(L1 + L2), no ramp-up.

The bank is training state: it is saved in the method's ``state_dict`` (``get_extra_state``), so
a resumed run sees the same negatives as an uninterrupted one (bit-identical on the CPU).

Decisions (where the paper and the official code leave a choice), with the reasons:

- Single device (A1): ``concat_all_gather`` becomes the identity on detached tensors; the bank
  holds 2 · selected_num · (step_save + 1) negatives, half of the official 2-GPU count.
- ``selected_num`` (A2): ``selected_frac`` = 0.5 of B·h·w at 1/8 per view (VOC: 6400 of 8·40·40
  = 12800), so it never exceeds the population whatever the batch and crop size.
- Classifier on the pooled 1/8 features (faithful, A4): the shared classifier is
  resolution-agnostic, and its pseudo-labels then live on the projector's grid. That pass
  normalises with its batch's statistics but does not update the BatchNorm running statistics
  (``batch_statistics_only``): the official classifier has no BatchNorm, and pooled features,
  with about half the variance of the 1/4 features the evaluated network sees, would bias the
  statistics used at test time (they did: two of five updates per step came from them).
- Start epoch: the engine's ``unsup_start_epoch`` (every method's gate, so the comparison is
  at the same schedule) unless ``start_epoch`` is set (the official 5, 0-based, of 80 epochs).
- Flips: each crop draws a left-right *and* an up-down flip (official: left-right only), as all
  our augmentations, nuclei having no orientation; the flip-back is exact at 1/8 because the
  crop side is a multiple of 32 (A8).
- Crop geometry: the crop side is ``train.augment.two_crop_frac`` (0.7) of the input, rounded
  down to a multiple of 32; no rescaling of the image (the official random 0.8–2× rescale and
  padding belong to VOC's data pipeline; our labeled pipeline's crop-and-resize is the shared
  augmentation), so A3's padded pixels never occur.
- No chunking with ``torch.utils.checkpoint``: the anchors × negatives similarities of our batch
  sizes fit in memory; the loss is computed as softplus(logsumexp(neg − pos)) in float32, stable and
  exact for a confident positive.
- Optimiser: the engine's Adam with the run's lr and poly schedule (as every method; the
  official SGD with a 10× head lr is the VOC recipe).

Measured (``docs/results-cpu-dsb.md``, "CAC at 1/128"; ``benchmarks/diagnose_cac.py``): with 4
labeled images and a random-init network, λ = 0.1 sends the extractor a gradient 1.4-4.5× L_s's
and orthogonal to it, and validation Dice falls where the term starts although the pseudo-labels
are 77-90 % right; at λ = 0.01 the drop is gone. Under Adam, λ does not change the projector's
steps (only this term trains it), only the pull on the shared extractor.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from semibench.data.augment import undo_flips
from semibench.errors import ConfigError, TrainingError
from semibench.losses import supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo, batch_statistics_only
from semibench.registry import register_method

STRIDE = 8  # the projector's output stride: crop offsets and overlap boxes are multiples of it


@dataclass
class CACHparams:
    """Defaults: the official VOC configs (``configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json``)."""

    weight_unsup: float = 0.1  # λ
    temp: float = 0.1  # τ
    pos_thresh: float = 0.75  # γ
    selected_frac: float = 0.5  # negatives per view / (B·h·w) at 1/8 (decision A2)
    step_save: int = 1  # the bank keeps step_save + 1 steps
    start_epoch: int | None = None  # None: the engine's unsup_start_epoch (official: 5)

    def __post_init__(self):
        if self.temp <= 0 or self.weight_unsup < 0 or not 0.0 <= self.pos_thresh <= 1.0:
            raise ConfigError(f"cac: need temp > 0, weight_unsup >= 0, 0 <= pos_thresh <= 1, got {self}")
        if not 0.0 < self.selected_frac <= 1.0:
            raise ConfigError(f"cac: selected_frac must be in (0, 1], got {self.selected_frac}")
        if self.step_save < 0 or (self.start_epoch is not None and self.start_epoch < 0):
            raise ConfigError(f"cac: step_save and start_epoch must be >= 0, got {self}")


# ---------------------------------------------------------------------------- loss pieces

def overlap(x: torch.Tensor, box: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """The overlap region of a (B, C, h, w) map at 1/``stride``, boxes (B, 4) in input pixels
    (top, left, bottom, right; multiples of ``stride``), flattened to (Σ_b n_b, C) in (b, y, x)
    order."""
    if bool((box % stride != 0).any()):
        raise TrainingError(f"cac: overlap boxes must be multiples of {stride}, got {box.tolist()}")
    b = (box // stride).tolist()
    return torch.cat([x[i, :, t:bb, lf:r].flatten(1).t() for i, (t, lf, bb, r) in enumerate(b)])


def directional_masks(k1: torch.Tensor, k2: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """m1 = 1[κ2 > γ ∧ κ1 < κ2] (view 1 learns from the more confident view 2), m2 mirrored."""
    m1 = ((k2 > gamma) & (k1 < k2)).float()
    m2 = ((k1 > gamma) & (k2 < k1)).float()
    return m1, m2


def directional_nce(anchor: torch.Tensor, positive: torch.Tensor, anchor_labels: torch.Tensor,
                    bank: torch.Tensor, bank_labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-anchor ℓ = −log(e^{a·sg(p)/τ} / (e^{a·sg(p)/τ} + Σ_n 1[ŷ_n ≠ ŷ_a]·e^{a·sg(z_n)/τ})),
    (N,) float32; the positive and the bank carry no gradient."""
    a = anchor.float()
    pos = (a * positive.detach().float()).sum(1, keepdim=True) / tau  # (N, 1)
    neg = a @ bank.detach().float().t() / tau  # (N, M)
    # same-label entries get a huge finite negative, not −inf: an anchor without any negative
    # (A7) then has ℓ = 0 and a zero gradient (an all −inf logsumexp back-propagates NaN)
    d = (neg - pos).masked_fill(anchor_labels[:, None] == bank_labels[None, :], -1e30)
    # ℓ = log(1 + Σ_n e^{neg_n − pos}) = softplus(logsumexp(neg − pos)): no cancellation of two
    # large terms (a float32 logsumexp([pos, neg]) − pos loses ~1e-6 at pos = 10)
    return F.softplus(torch.logsumexp(d, 1))


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (loss * mask).sum() / (mask.sum() + 1e-12)


# ---------------------------------------------------------------------------- method

@register_method("cac")
class CAC(Method):
    display_name = "CAC"
    report_rank = 70
    in_paper = True
    colour = "#e377c2"
    Hparams: ClassVar[type] = CACHparams
    unlabeled_views: ClassVar[str | None] = "two_crops"
    view_options: ClassVar[dict] = {"stride": STRIDE, "iou": (0.1, 1.0)}

    def __init__(self, ctx: MethodContext, hp: CACHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())
        self.bank: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.hp.step_save + 1)

    def _view(self, crop: torch.Tensor, flip: torch.Tensor):
        """z (normalised projections), κ, ŷ of one crop at 1/8, flipped back."""
        out = self.student(crop, project=True)
        with batch_statistics_only(self.student.classifier):  # pooled features: not the test's
            logits = self.student.classifier(F.avg_pool2d(out.features, 2, 2)).detach().float()
        conf, label = logits.softmax(1).max(1)
        z = F.normalize(out.proj.float(), dim=1)
        if tuple(z.shape[-2:]) != tuple(label.shape[-2:]):
            raise TrainingError(f"cac: projector grid {tuple(z.shape[-2:])} differs from the pooled "
                                f"classifier grid {tuple(label.shape[-2:])}")
        return undo_flips(z, flip), undo_flips(conf, flip), undo_flips(label, flip)

    def _negatives(self, z: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat_z, flat_y = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), label.reshape(-1)
        n = max(1, int(self.hp.selected_frac * flat_y.numel()))
        idx = torch.randperm(flat_y.numel(), device=flat_y.device)[:n]
        return flat_z[idx], flat_y[idx]

    def push_bank(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank.append((feats.detach(), labels.detach()))

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        hp = self.hp
        L_s = supervised_loss(self.student, batch)
        active = step.unsup_active if hp.start_epoch is None else step.epoch >= hp.start_epoch
        if not active:
            return {"loss": L_s, "L_s": L_s.detach()}
        u = batch.unlabeled
        z1, k1, y1 = self._view(u["crop1"], u["flip1"])
        z2, k2, y2 = self._view(u["crop2"], u["flip2"])
        n1, l1 = self._negatives(z1, y1)
        n2, l2 = self._negatives(z2, y2)
        self.push_bank(torch.cat([n1, n2]), torch.cat([l1, l2]))  # the current step is in the bank
        bank = torch.cat([f for f, _ in self.bank])
        bank_y = torch.cat([y for _, y in self.bank])
        o1, o2 = overlap(z1, u["box1"]), overlap(z2, u["box2"])
        c1, c2 = overlap(k1[:, None], u["box1"])[:, 0], overlap(k2[:, None], u["box2"])[:, 0]
        p1, p2 = overlap(y1[:, None], u["box1"])[:, 0], overlap(y2[:, None], u["box2"])[:, 0]
        m1, m2 = directional_masks(c1, c2, hp.pos_thresh)
        L1 = masked_mean(directional_nce(o1, o2, p1, bank, bank_y, hp.temp), m1)
        L2 = masked_mean(directional_nce(o2, o1, p2, bank, bank_y, hp.temp), m2)
        loss = L_s + hp.weight_unsup * (L1 + L2)
        return {"loss": loss, "L_s": L_s.detach(), "L1": L1.detach(), "L2": L2.detach(),
                "active_1": m1.mean().detach(), "active_2": m2.mean().detach()}

    # The bank is training state (see the module docstring).
    def get_extra_state(self) -> dict:
        return {"bank": [{"features": f.cpu(), "labels": y.cpu()} for f, y in self.bank]}

    def set_extra_state(self, state: dict) -> None:
        device = next(self.student.parameters()).device
        self.bank.clear()
        for e in state.get("bank", []):
            self.bank.append((e["features"].to(device), e["labels"].to(device)))
