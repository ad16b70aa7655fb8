"""GCT: Guided Collaborative Training (Ke et al., ECCV 2020), after the official PixelSSL
``pixelssl/ssl_algorithm/ssl_gct.py``.

Two task models f_l and f_r (two shared DenseUNets, no EMA) see the same batch (labeled ⊕
unlabeled, one ``"single"`` view); a flaw detector F (:class:`FlawDetector`, image ⊕ softmax,
3 + C input channels) predicts where a prediction is wrong. Per step:

0. p_k = softmax(f_k(x)) (detached), F's flaw maps m_k = F(x, p_k); the flaw-map handler
   (clamp ≥ 0, blur, "no flaw" when the max is ≤ 0.1, per-sample min-max) gives h_k; the
   dynamic-consistency targets (:func:`dc_targets`, threshold ξ) pick, pixel by pixel, the
   prediction of the model whose flaw is lower, and fc_mask marks pixels flawed in both;
1. each task model with F frozen: L_task (CE on the labeled part) + λ_fc·L_fc (mean of
   fc_mask · F(x, p_k)², gradient through F's input into f_k) + r(t)·λ_dc·L_dc (MSE of p_k to its
   target, mean over B·C·H·W), r(t) = exp(−5(1 − t/T)²) over the first ``dc_rampup`` of the
   iterations that train L_dc (``StepInfo.unsup_rampup``);
2. F on its flaw target (:func:`flaw_target`: μ·Σ_c|onehot(y) − p|, blur, ν × (max-pool 3×3,
   blur), per-sample min-max), labeled part only, weight λ_fd, averaged over the two models.

The phases are the engine's per-optimiser losses (``semibench.method``, update steps):
``loss/task_l`` and ``loss/task_r`` reach only their task model's parameters — F is frozen for
them by the engine, which back-propagates each loss into its own optimiser's parameters only —
and ``loss/flaw`` reaches F only. F has its own Adam (lr 1e-4, betas (0.9, 0.99), poly like
every optimiser of the engine).

Decisions, in short (reasons and measurements: docs/methods/gct.md):
- G4: blur kernels 5, 9, 17 px at nucleus scale (the official 1 : 2 : 4 ratio), σ by OpenCV's rule.
- G1: the handler clamps a detached copy (the official in-place clamp through ``.data`` is an
  accident); G2: a flaw map whose max is ≤ 0.1 becomes exactly 0, per sample.
- One forward per task model and one F pass per model per step (the official code runs each
  twice); F's gradient equals the official F(x, sg(p_k)).
- Evaluated model: f_l; both task models' validation Dice are logged.
- The engine's Adam, lr and poly schedule for both task models, independently initialised.
- Ramp-up of λ_dc over 5/45 of the iterations from the engine's start gate; before the gate
  only L_task and F's loss are trained.
- λ_dc stays the official 100 although it was set for C = 21 classes (class-count-matched at
  C = 2: 100·2/21 ≈ 9.52, ``method_params.gct.lambda_dc``).
- F's width ``fd_channels`` = 64 as the official stack (inputs of at least 64²).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from semibench.data.augment import gaussian_blur
from semibench.errors import ConfigError, TrainingError
from semibench.losses import cross_entropy
from semibench.method import Batch, Method, MethodContext, StepInfo
from semibench.registry import register_method


@dataclass
class GCTHparams:
    """Defaults: the official PSPNet/VOC 1/8 script (``task/sseg/script/*_sslgct.py``)."""

    lambda_fc: float = 1.0  # fc_ssl_scale
    lambda_dc: float = 100.0  # dc_ssl_scale
    dc_threshold: float = 0.6  # ξ
    dc_rampup: float = 5 / 45  # fraction of the unsupervised iterations (5 of 45 epochs)
    lambda_fd: float = 10.0  # fd_scale of the scripts
    fd_lr: float = 1e-4
    fd_betas: tuple[float, float] = (0.9, 0.99)
    mu: float = 0.5  # flaw-target scale
    nu: int = 1  # dilate-and-blur rounds of the flaw target
    no_flaw_max: float = 0.1  # a handled flaw map whose max is ≤ this is "no flaw"
    handler_blur: int = 5  # kernel sizes in pixels, odd (decision G4: docs/methods/gct.md)
    target_blur: int = 9
    dilate_blur: int = 17
    fd_channels: int = 64  # width of F's first layer

    def __post_init__(self):
        for name in ("handler_blur", "target_blur", "dilate_blur"):
            k = getattr(self, name)
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ConfigError(f"gct: {name} must be an odd integer >= 1, got {k!r}")
        if not 0.0 < self.dc_threshold < 1.0:
            raise ConfigError(f"gct: dc_threshold must be in (0, 1), got {self.dc_threshold}")
        if self.nu < 0 or self.fd_channels < 2 or self.fd_lr <= 0:
            raise ConfigError(f"gct: need nu >= 0, fd_channels >= 2, fd_lr > 0, got {self}")
        self.fd_betas = tuple(float(b) for b in self.fd_betas)


# ---------------------------------------------------------------------------- flaw detector

class IBNorm(nn.Module):
    """First half of the channels BatchNorm (affine), the rest InstanceNorm (no affine)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn_channels = channels // 2
        self.bn = nn.BatchNorm2d(self.bn_channels)
        self.inorm = nn.InstanceNorm2d(channels - self.bn_channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.bn_channels
        return torch.cat([self.bn(x[:, :c]), self.inorm(x[:, c:])], 1)


class FlawDetector(nn.Module):
    """The official ``FlawDetector``: k4 p1 convolutions (s2 → w, s2 → 2w, s1 → 2w, s2 → 4w,
    s1 → 4w, s2 → 8w, s1 → 8w), each followed by IBNorm and LeakyReLU(0.2), a k4 s2 classifier
    to one channel, bilinear (align_corners=True) upsampling to the input size, no activation."""

    MIN_SIZE = 64

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        w = width
        plan = [(in_channels, w, 2), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2),
                (4 * w, 4 * w, 1), (4 * w, 8 * w, 2), (8 * w, 8 * w, 1)]
        layers: list[nn.Module] = []
        for cin, cout, s in plan:
            layers += [nn.Conv2d(cin, cout, 4, s, 1), IBNorm(cout), nn.LeakyReLU(0.2, inplace=True)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(8 * w, 1, 4, 2, 1)

    def forward(self, image: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        if min(image.shape[-2:]) < self.MIN_SIZE:
            raise TrainingError(f"gct's flaw detector needs inputs of at least {self.MIN_SIZE}², "
                                f"got {tuple(image.shape[-2:])}; raise train.input_size")
        x = torch.cat([image, prob.to(image.dtype)], 1)
        m = self.classifier(self.body(x))
        return F.interpolate(m, size=image.shape[-2:], mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------- loss pieces

def blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-channel Gaussian blur, odd kernel ``k``, reflect padding, OpenCV's σ for ``k``."""
    if k <= 1:
        return x
    sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8
    radius = min((k - 1) // 2, x.shape[-1] - 1, x.shape[-2] - 1)
    return gaussian_blur(x, torch.full((x.shape[0],), sigma, dtype=torch.float64), radius)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1] (the official + 1e-9 in the denominator)."""
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo + 1e-9)


@torch.no_grad()
def handle_flawmap(m: torch.Tensor, k: int, no_flaw_max: float = 0.1) -> torch.Tensor:
    """The official ``FlawmapHandler`` on a detached copy: clamp ≥ 0, blur, a sample whose max
    is ≤ ``no_flaw_max`` becomes exactly 0 (G2 fixed), else per-sample min-max."""
    h = blur(m.detach().float().clamp(min=0), k)
    flat_max = h.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return torch.where(flat_max > no_flaw_max, minmax(h), torch.zeros_like(h))


@torch.no_grad()
def dc_targets(h_l: torch.Tensor, h_r: torch.Tensor, xi: float) -> tuple[torch.Tensor, ...]:
    """The official ``DCGTGenerator``: flaws above ξ count as 1; keep_l = 1[h'_r ≥ h'_l]
    (f_l keeps its own prediction where f_r is not strictly better), keep_r likewise, fc_mask =
    1[h_l > ξ and h_r > ξ]. Returns float masks (keep_l, keep_r, fc_mask)."""
    hl = torch.where(h_l <= xi, h_l, torch.ones_like(h_l))
    hr = torch.where(h_r <= xi, h_r, torch.ones_like(h_r))
    keep_l = (hr >= hl).float()
    keep_r = (hl >= hr).float()
    fc_mask = ((h_l > xi) & (h_r > xi)).float()
    return keep_l, keep_r, fc_mask


@torch.no_grad()
def flaw_target(prob: torch.Tensor, mask: torch.Tensor, hp: GCTHparams) -> torch.Tensor:
    """The official ``FDGTGenerator`` on the labeled part: d = μ·Σ_c |onehot(y) − p|, blur,
    ν × (3×3 max-pool with reflect padding, blur), per-sample min-max. (B, 1, H, W)."""
    onehot = F.one_hot(mask, prob.shape[1]).permute(0, 3, 1, 2).float()
    d = hp.mu * (onehot - prob.float()).abs().sum(1, keepdim=True)
    d = blur(d, hp.target_blur)
    for _ in range(hp.nu):
        d = blur(F.max_pool2d(F.pad(d, (1, 1, 1, 1), mode="reflect"), 3, 1), hp.dilate_blur)
    return minmax(d)


# ---------------------------------------------------------------------------- method

@register_method("gct")
class GCT(Method):
    display_name = "GCT"
    report_rank = 50
    in_paper = True
    colour = "#9467bd"
    Hparams: ClassVar[type] = GCTHparams
    unlabeled_views: ClassVar[str | None] = "single"  # one view, shared by both task models

    def __init__(self, ctx: MethodContext, hp: GCTHparams | None = None):
        super().__init__(hp)
        self.task_l = ctx.build_segmenter()
        self.task_r = ctx.build_segmenter()
        num_classes = self.task_l.classifier.conv2.out_channels
        self.flaw_detector = FlawDetector(3 + num_classes, self.hp.fd_channels).to(ctx.device)
        ctx.add_optimizer(self.task_l.parameters(), name="task_l")
        ctx.add_optimizer(self.task_r.parameters(), name="task_r")
        ctx.add_optimizer(self.flaw_detector.parameters(), name="flaw", lr=self.hp.fd_lr,
                          betas=self.hp.fd_betas)

    def inference_model(self) -> nn.Module:
        return self.task_l

    def extra_validation_models(self) -> dict[str, nn.Module]:
        return {"task_l": self.task_l, "task_r": self.task_r}

    def dc_weight(self, step: StepInfo) -> float:
        """λ_dc · r(t), the ramped weight of L_dc."""
        return self.hp.lambda_dc * step.unsup_rampup(self.hp.dc_rampup)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        hp = self.hp
        n_lab = batch.labeled_image.shape[0]
        x = batch.labeled_image
        if step.unsup_active:
            if "image" not in batch.unlabeled:
                raise TrainingError("gct needs the 'single' unlabeled view ('image')")
            x = torch.cat([x, batch.unlabeled["image"]])
        z_l = self.task_l(x, project=False).logits
        z_r = self.task_r(x, project=False).logits
        p_l, p_r = z_l.float().softmax(1), z_r.float().softmax(1)
        # step 0 and 1 share F's pass: L_fc goes into f_k only, L_fd into F only (engine routing)
        m_l, m_r = self.flaw_detector(x, p_l).float(), self.flaw_detector(x, p_r).float()
        L_task_l = cross_entropy(z_l[:n_lab], batch.labeled_mask)
        L_task_r = cross_entropy(z_r[:n_lab], batch.labeled_mask)
        zero = L_task_l.new_zeros(())
        L_fc_l = L_fc_r = L_dc_l = L_dc_r = zero
        w_dc = 0.0
        if step.unsup_active:
            h_l = handle_flawmap(m_l, hp.handler_blur, hp.no_flaw_max)
            h_r = handle_flawmap(m_r, hp.handler_blur, hp.no_flaw_max)
            keep_l, keep_r, fc_mask = dc_targets(h_l, h_r, hp.dc_threshold)
            pd_l, pd_r = p_l.detach(), p_r.detach()
            t_l = keep_l * pd_l + (1 - keep_l) * pd_r
            t_r = keep_r * pd_r + (1 - keep_r) * pd_l
            L_fc_l = (fc_mask * m_l ** 2).mean()
            L_fc_r = (fc_mask * m_r ** 2).mean()
            L_dc_l = F.mse_loss(p_l, t_l)
            L_dc_r = F.mse_loss(p_r, t_r)
            w_dc = self.dc_weight(step)
        g_l = flaw_target(p_l.detach()[:n_lab], batch.labeled_mask, hp)
        g_r = flaw_target(p_r.detach()[:n_lab], batch.labeled_mask, hp)
        L_fd = hp.lambda_fd * (F.mse_loss(m_l[:n_lab], g_l) + F.mse_loss(m_r[:n_lab], g_r)) / 2
        return {
            "loss/task_l": L_task_l + hp.lambda_fc * L_fc_l + w_dc * L_dc_l,
            "loss/task_r": L_task_r + hp.lambda_fc * L_fc_r + w_dc * L_dc_r,
            "loss/flaw": L_fd,
            "L_task_l": L_task_l.detach(), "L_task_r": L_task_r.detach(),
            "L_fc_l": L_fc_l.detach(), "L_fc_r": L_fc_r.detach(),
            "L_dc_l": L_dc_l.detach(), "L_dc_r": L_dc_r.detach(),
            "L_fd": L_fd.detach(), "w_dc": zero.new_tensor(w_dc),
        }
