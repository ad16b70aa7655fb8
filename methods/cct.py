"""Cross-Consistency Training, CCT (Ouali, Hudelot & Tami, CVPR 2020), on the shared DenseUNet.

- The *main decoder* is the student's own classifier; K *auxiliary heads* read perturbed
  copies of the unlabeled image's 256-channel extractor features (``SegOutput.features``).
  Perturbations (methods/_cct_perturbations.py): VAT, channel-wise Dropout, guided cutout,
  context masking, object masking, feature drop, feature noise.
- L = L_sup + w_u(t) · L_u (the paper's L_s and L_u). L_sup: cross-entropy of the student on
  the labeled batch.
  L_u = (1/K) Σ_k mean_{B,C,H,W} (softmax(ŷ_k) − softmax(sg(ŷ)))², ŷ the main head's logits on
  the unlabeled features, ŷ_k the k-th aux head's. w_u(t) = weight_u · exp(−5 (1 − t/T)²),
  t the iterations since the unsupervised losses started, T = rampup × the iterations from
  there to the end (``StepInfo.unsup_rampup``). Before the configured start epoch
  (``step.unsup_active`` False) only L_sup is computed.
- Gradient routing as the official code (confirmed in yassouali/CCT#43): the main head is
  trained by L_sup only (its unlabeled prediction enters L_u detached), the aux heads by L_u only
  (they never see labeled data), the encoder/decoder by both (L_u reaches it through the aux
  heads' inputs). The aux heads are not part of the evaluated network: ``inference_model`` is
  the student. They are checkpointed with the method and stepped by the student's optimiser.
- Unlabeled view: the engine's ``"single"`` view (the labeled pipeline's augmentation), since
  CCT perturbs features, not images, and trains on one unlabeled view per image (the official
  code augments unlabeled and labeled crops alike).

Defaults: the official ``configs/config.json`` of ``yassouali/CCT`` @65d4e5b (cited per field);
the feature-drop range is hard-coded in its ``models/decoders.py``.

Decisions, in short (reasons and measurements: docs/methods/cct.md):
- C1: the main decoder is the shared classifier; each aux head a fresh copy of it (no
  ReLU/PixelShuffle); K = 30 heads at the official counts, in the student's optimiser, 1× lr.
- Main and aux logits are compared at the input resolution (guided masks are built there).
- C2, VAT: direction by ``torch.autograd.grad`` in float32, probes in eval mode, exact per-sample
  normalisation (no ``+1e-8``); ξ stays the official 1e-6 (``xi``).
- C4, G-Cutout: every 8-connected component of the predicted mask is cut (no ">50 contour
  points" filter, no OpenCV).
- C6: F-Noise and F-Drop draw once per call for the batch; VAT's d is per element.
- The target is the main head's training-mode output; no EMA teacher (``train.ema_alpha``
  unused); the engine's optimiser, poly LR, batches and run length.
- weight_u stays the official 30 although it was set for C = 21 classes (at C = 2 the
  class-count-matched value is 30·2/21 ≈ 2.86, ``method_params.cct.weight_u``).
- Ramp-up over 10 % of the iterations that train L_u, counted from the engine's start gate.
- C3 (pair-wise loss) and confidence masking, both off in the official code, are not built.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from semibench.errors import ConfigError, TrainingError
from semibench.losses import softmax_mse, supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo
from semibench.methods import _cct_perturbations as P
from semibench.network.model import Classifier
from semibench.registry import register_method

# aux head kinds in the official construction order (models/model.py CCT.__init__)
KINDS = ("vat", "drop", "cutout", "context_masking", "object_masking", "feature_drop", "feature_noise")
GUIDED = {"cutout", "context_masking", "object_masking"}


@dataclass
class CCTHparams:
    weight_u: float = 30.0  # config.json "unsupervised_w"
    rampup: float = 0.1  # config.json "ramp_up": sigmoid ramp over this fraction of the L_u iterations
    # aux head counts, config.json "model" section (K = 30)
    vat: int = 2
    drop: int = 6
    cutout: int = 6
    context_masking: int = 2
    object_masking: int = 2
    feature_drop: int = 6
    feature_noise: int = 6
    xi: float = 1e-6  # config.json "xi" (VAT finite-difference step)
    eps: float = 2.0  # config.json "eps" (VAT perturbation norm)
    vat_iterations: int = 1  # VATDecoder default "iterations" (one power iteration)
    drop_rate: float = 0.5  # config.json "drop_rate", "spatial": true (channel-wise)
    erase: float = 0.4  # config.json "erase" (G-Cutout box fraction)
    uniform_range: float = 0.3  # config.json "uniform_range" (F-Noise)
    feature_drop_low: float = 0.7  # decoders.py FeatureDropDecoder: np.random.uniform(0.7, 0.9)
    feature_drop_high: float = 0.9

    def __post_init__(self):
        counts = {k: getattr(self, k) for k in KINDS}
        bad = [k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ConfigError(f"cct: aux head counts must be integers >= 0, got "
                              f"{', '.join(f'{k}={counts[k]!r}' for k in bad)}")
        if sum(counts.values()) < 1:
            raise ConfigError("cct: needs at least one auxiliary head (all counts are 0)")
        checks = [
            (self.weight_u >= 0, "weight_u >= 0"), (self.rampup >= 0, "rampup >= 0"),
            (self.xi >= 0, "xi >= 0"), (self.eps >= 0, "eps >= 0"),
            (isinstance(self.vat_iterations, int) and self.vat_iterations >= 1, "vat_iterations >= 1"),
            (0 <= self.drop_rate < 1, "0 <= drop_rate < 1"), (0 <= self.erase <= 1, "0 <= erase <= 1"),
            (self.uniform_range >= 0, "uniform_range >= 0"),
            (0 <= self.feature_drop_low <= self.feature_drop_high, "0 <= feature_drop_low <= feature_drop_high"),
        ]
        failed = [msg for ok, msg in checks if not ok]
        if failed:
            raise ConfigError(f"cct: need {'; '.join(failed)}; got {self}")

    def kinds(self) -> list[str]:
        """One entry per aux head, in the official order."""
        return [k for k in KINDS for _ in range(getattr(self, k))]


def fresh_head(classifier: nn.Module) -> nn.Module:
    """A new, independently initialised head of the classifier's architecture."""
    if isinstance(classifier, Classifier):  # through the model's own constructor and init
        return Classifier(classifier.conv1.in_channels, classifier.conv1.out_channels,
                          classifier.conv2.out_channels, classifier.dropout.p)
    head = copy.deepcopy(classifier)
    for m in head.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return head


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    # as DenseUNet.head_logits, so aux and main logits live on the same grid
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@contextmanager
def eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@register_method("cct")
class CCT(Method):
    display_name = "CCT"
    report_rank = 60
    in_paper = True
    colour = "#8c564b"
    Hparams: ClassVar[type] = CCTHparams
    unlabeled_views: ClassVar[str | None] = "single"

    def __init__(self, ctx: MethodContext, hp: CCTHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        classifier = getattr(self.student, "classifier", None)
        if not isinstance(classifier, nn.Module):
            raise ConfigError("cct needs a segmenter with a 'classifier' head on its features "
                              f"(got {type(self.student).__name__})")
        self.kinds = self.hp.kinds()
        self.aux_heads = nn.ModuleList(fresh_head(classifier) for _ in self.kinds).to(ctx.device)
        # one optimiser: the aux heads share the head's learning rate, as the official code
        ctx.add_optimizer([*self.student.parameters(), *self.aux_heads.parameters()])

    def unsup_weight(self, step: StepInfo) -> float:
        return self.hp.weight_u * step.unsup_rampup(self.hp.rampup)

    def perturb(self, kind: str, head: nn.Module, features: torch.Tensor, target: torch.Tensor,
                boxes) -> torch.Tensor:
        hp = self.hp
        if kind == "vat":
            size = target.shape[-2:]
            with eval_mode(head):
                r_adv = P.vat_perturbation(features, lambda f: upsample(head(f), size),
                                           hp.xi, hp.eps, hp.vat_iterations)
            return features + r_adv.to(features.dtype)
        if kind == "drop":
            return P.dropout(features, hp.drop_rate)
        if kind == "cutout":
            return P.guided_cutout(features, target, hp.erase, boxes)
        if kind == "context_masking":
            return P.context_masking(features, target)
        if kind == "object_masking":
            return P.object_masking(features, target)
        if kind == "feature_drop":
            return P.feature_drop(features, low=hp.feature_drop_low, high=hp.feature_drop_high)
        if kind == "feature_noise":
            return P.feature_noise(features, hp.uniform_range)
        raise ConfigError(f"cct: unknown perturbation {kind!r}")

    def unsupervised_loss(self, features: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
        """L_u: mean over the aux heads of softmax-MSE to the detached main prediction."""
        target = main_logits.detach()
        boxes = P.object_boxes(target) if "cutout" in self.kinds else None  # once per step
        losses = []
        for kind, head in zip(self.kinds, self.aux_heads):
            h_k = self.perturb(kind, head, features, target, boxes)
            losses.append(softmax_mse(upsample(head(h_k), target.shape[-2:]), target))
        return torch.stack(losses).mean()

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        L_sup = supervised_loss(self.student, batch)
        if not step.unsup_active:
            return {"loss": L_sup, "L_sup": L_sup.detach()}
        if "image" not in batch.unlabeled:
            raise TrainingError(f"cct needs the 'image' unlabeled view (view kind 'single'); the "
                                f"batch has {', '.join(sorted(batch.unlabeled)) or 'none'}")
        out = self.student(batch.unlabeled["image"], project=False)
        L_u = self.unsupervised_loss(out.features, out.logits)
        w = self.unsup_weight(step)
        return {"loss": L_sup + w * L_u, "L_sup": L_sup.detach(), "L_u": L_u.detach(),
                "w_u": L_sup.new_tensor(w)}
