"""TCSMv2: transformation-consistent self-ensembling (Li et al., TNNLS 2020), a mean teacher
whose teacher sees a transformed view and whose prediction is mapped back before the loss.

Per step, on one unlabeled batch (the engine's ``"single"`` view: one augmented crop x_u):

- the student predicts on the clean x_u **with gradient**;
- the EMA teacher predicts, without gradient, on T(x_u + ξ): Gaussian noise ξ, then per sample
  a flip of the H axis and ``rot90`` by k ∈ {0..3}, then a scale s ∈ U(0.9, 1.1) (zoom-in: centre
  crop of int(s·H) pixels resized to H; zoom-out: edge padding to int(s·H), resized to H);
- its logits are mapped back, T⁻¹ = scale⁻¹ then rot⁻¹ then flip⁻¹, with a per-sample mask of
  the pixels the teacher saw (after a zoom-in, the border ring is invalid);
- L_u = mean over B, C, H, W of (softmax(student) − softmax(T⁻¹ teacher))² on the valid pixels
  (``semibench.losses.softmax_mse``); L = L_sup + λ(t)·L_u with
  λ(t) = consistency · exp(−5 (1 − t/R)²), t the iterations since the unsupervised losses
  started, R = 75 % of the iterations from there on (``StepInfo.unsup_rampup``; the release
  starts its consistency at iteration 0).

Defaults from the official code (``xmengli999/TCSM`` ``train_tcsm_mean.py``, its
``scripts_skin/train_50tcsm.sh`` and ``lib.py``):
consistency 1.0 (script), ramp-up 600 of 800 "epochs" → 0.75 of training, EMA α 0.999 with the
warm-up min(1 − 1/(t+1), α) on parameters only, noise σ = 0.5 grey levels, scale U(0.9, 1.1),
flip and k uniform.

Decisions (where the paper and the release leave a choice), each with its reason:

- Gradient (B1): the released code wraps the whole unlabeled branch, student included, in
  ``no_grad``, so it never trains on unlabeled data. We implement the described method: the
  student's clean pass carries gradient, the teacher's none. No flag reproduces the bug.
- Scale (B2, B3): applied once and inverted once (the release scales twice and inverts once),
  with a per-sample valid mask (the release's mask is dropped for the whole batch as soon as one
  sample zooms out). The loss is averaged over valid pixels only (the release zeroes invalid
  pixels but keeps them in the mean, which shrinks the loss by the valid fraction). Resizing is
  bilinear (the network's own upsampling) instead of the release's bicubic: bicubic overshoots
  on logits, and the scale need not be differentiable. The scaled size int(s·H) keeps the parity
  of H (the release: even sizes at H = 224), so the centre offset is a whole pixel.
- Noise: σ = 0.5 grey levels, the release's value in its 0–255 input units, rescaled to our
  ImageNet normalisation per channel (0.5 / 255 / std_c ≈ 0.009); ``noise_grey_levels`` tunes it.
- Orientation: the release's (student clean, teacher transformed); under rot/flip MSE it is
  symmetric anyway.
- Consistency data: unlabeled images only, as the official script (``--wlabeled`` off), though
  the abstract mentions labeled and unlabeled data.
- Teacher: as the release, in train mode while training (BN batch statistics, dropout on),
  parameters averaged with the warm-up, BN buffers not averaged (the teacher's forward passes
  keep its own statistics); settings in the hyperparameters ``teacher_mode``,
  ``teacher_average_buffers``, ``ema_warmup``. The warm-up's t is the engine's 0-based global
  iteration (the first update copies the student); whether the release counts from 0 or 1
  shifts α by one step.
- Schedule: the benchmark's engine (Adam, poly LR, epochs, batch, unsup start epoch) instead of
  the release's constant-lr Adam over 8000 iterations; the ramp-up keeps its fraction (600/800)
  and is iteration-based (the release's "epochs" are 10 iterations). Supervised loss: plain CE
  (the release's ISIC class weights [1.93, 8.06] are dataset-specific), as every method here.
- Evaluation: the student, as every method of the benchmark (the release keeps the better of
  student and teacher on validation, a selection on the val set we do not make); the teacher's
  val Dice is logged as ``val_dice/teacher``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from semibench.data.loading import IMAGENET_STD
from semibench.errors import ConfigError, TrainingError
from semibench.losses import flip_rot, flip_rot_inverse, sample_flip_rot, softmax_mse, supervised_loss
from semibench.method import Batch, Method, MethodContext, StepInfo, ema_teacher_from_hparams
from semibench.registry import register_method


@dataclass
class TCSMv2Hparams:
    consistency: float = 1.0  # λ_max (train_50tcsm.sh --consistency 1.0)
    rampup: float = 0.75  # sigmoid ramp-up length / the unsupervised iterations (600 of 800 "epochs")
    ema_alpha: float = 0.999  # argparse default, not overridden by the script
    ema_warmup: bool = True  # α_t = min(1 − 1/(t+1), α) (utils.update_ema_variables)
    teacher_mode: str = "train"  # the release runs the teacher in train mode
    teacher_average_buffers: bool = False  # the release averages parameters only
    noise_grey_levels: float = 0.5  # σ of ξ in 0–255 grey levels (lib.transforms_for_noise)
    scale_min: float = 0.9  # s ~ U(scale_min, scale_max) (lib.transforms_for_scale)
    scale_max: float = 1.1

    def __post_init__(self):
        if self.consistency < 0 or self.rampup < 0 or self.noise_grey_levels < 0:
            raise ConfigError(f"tcsmv2: consistency, rampup and noise_grey_levels must be >= 0, got {self}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError(f"tcsmv2: need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")


# ---------------------------------------------------------------------------- the scale transform

def scaled_sizes(scales: torch.Tensor, size: int) -> list[int]:
    """int(s·size) per sample, moved down by one where its parity differs from ``size`` (so the
    centre offset |m − size| / 2 is a whole pixel; the release: even sizes at 224)."""
    out = []
    for s in scales.tolist():
        m = max(2 - size % 2, int(s * size))
        out.append(m - 1 if (m - size) % 2 else m)
    return out


def _resize(x: torch.Tensor, m: int) -> torch.Tensor:
    return F.interpolate(x, size=(m, m), mode="bilinear", align_corners=False)


def scale_images(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The teacher's scale: per sample, m < H: the centre m×m crop resized to H (zoom-in);
    m > H: edge-padded to m×m and resized to H (zoom-out); m = H: unchanged."""
    h = x.shape[-1]
    out = []
    for xi, m in zip(x, sizes):
        xi = xi[None]
        if m < h:
            c = (h - m) // 2
            xi = _resize(xi[..., c:c + m, c:c + m], h)
        elif m > h:
            p = (m - h) // 2
            xi = _resize(F.pad(xi, (p, p, p, p), mode="replicate"), h)
        out.append(xi)
    return torch.cat(out)


def unscale_logits(z: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`scale_images` on (B, C, H, W) maps: resize to m×m, then m > H: the
    centre H×H crop; m < H: pasted into the centre of a zero H×H map. Returns the maps and the
    (B, 1, H, W) valid mask (1 where the teacher saw the pixel)."""
    h = z.shape[-1]
    maps, valid = [], torch.zeros(len(z), 1, h, h, device=z.device)
    for i, (zi, m) in enumerate(zip(z, sizes)):
        zi = zi[None]
        if m > h:
            p = (m - h) // 2
            zi = _resize(zi, m)[..., p:p + h, p:p + h]
            valid[i] = 1
        elif m < h:
            c = (h - m) // 2
            full = zi.new_zeros(zi.shape)
            full[..., c:c + m, c:c + m] = _resize(zi, m)
            zi = full
            valid[i, :, c:c + m, c:c + m] = 1
        else:
            valid[i] = 1
        maps.append(zi)
    return torch.cat(maps), valid


@dataclass
class Transform:
    """One batch's T: per-sample flip, quarter turns and scaled size."""

    flip: torch.Tensor
    k: torch.Tensor
    sizes: list[int]


def apply_transform(x: torch.Tensor, tf: Transform) -> torch.Tensor:
    """T on images: flip, rot90·k, then scale (noise is added before, by the caller)."""
    return scale_images(flip_rot(x, tf.flip, tf.k), tf.sizes)


def invert_transform(z: torch.Tensor, tf: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """T⁻¹ on logits: scale⁻¹, then rot⁻¹ and flip⁻¹; the valid mask goes back the same way."""
    z, valid = unscale_logits(z, tf.sizes)
    return flip_rot_inverse(z, tf.flip, tf.k), flip_rot_inverse(valid, tf.flip, tf.k)


# ---------------------------------------------------------------------------- the method

@register_method("tcsmv2")
class TCSMv2(Method):
    display_name = "TCSMv2"
    report_rank = 30
    in_paper = True
    colour = "#ff7f0e"
    Hparams: ClassVar[type] = TCSMv2Hparams
    unlabeled_views: ClassVar[str | None] = "single"  # one crop: clean for S, T(· + ξ) for the teacher

    def __init__(self, ctx: MethodContext, hp: TCSMv2Hparams | None = None):
        super().__init__(hp)
        hp = self.hp
        self.student = ctx.build_segmenter()
        self.teacher = ema_teacher_from_hparams(ctx, self.student, hp)
        ctx.add_optimizer(self.student.parameters())

    def consistency_weight(self, step: StepInfo) -> float:
        return self.hp.consistency * step.unsup_rampup(self.hp.rampup)

    def sample_transform(self, x: torch.Tensor) -> Transform:
        flip, k = sample_flip_rot(len(x), device=x.device)
        s = torch.empty(len(x)).uniform_(self.hp.scale_min, self.hp.scale_max)
        return Transform(flip, k, scaled_sizes(s, x.shape[-1]))

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """ξ ~ N(0, σ²) per pixel and channel, σ in grey levels rescaled to the normalised input."""
        sigma = torch.tensor([self.hp.noise_grey_levels / 255.0 / s for s in IMAGENET_STD],
                             device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return torch.randn(x.shape, device=x.device, dtype=x.dtype) * sigma

    def teacher_target(self, x: torch.Tensor, tf: Transform) -> tuple[torch.Tensor, torch.Tensor]:
        """T⁻¹ f_teacher(T(x + ξ)) and its valid mask, without gradient."""
        with torch.no_grad():
            z = self.teacher(apply_transform(x + self.noise(x), tf), project=False).logits
            return invert_transform(z, tf)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        L_sup = supervised_loss(self.student, batch)
        if not step.unsup_active:
            return {"loss": L_sup, "L_sup": L_sup.detach()}
        if "image" not in batch.unlabeled:
            raise TrainingError(f"tcsmv2 needs the 'image' unlabeled view; the batch has "
                                f"{', '.join(sorted(batch.unlabeled)) or 'none'}")
        x = batch.unlabeled["image"]
        logits_s = self.student(x, project=False).logits  # the clean view, with gradient
        logits_t, valid = self.teacher_target(x, self.sample_transform(x))
        L_u = softmax_mse(logits_s, logits_t, valid)
        w = self.consistency_weight(step)
        return {"loss": L_sup + w * L_u, "L_sup": L_sup.detach(), "L_u": L_u.detach(),
                "w_u": L_sup.new_tensor(w), "valid_frac": valid.mean()}

    def extra_validation_models(self) -> dict:
        return {"teacher": self.teacher}
