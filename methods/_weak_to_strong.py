"""What FixMatch and UniMatch share (Yang et al., CVPR 2023, official code ``LiheYoung/UniMatch``,
``fixmatch.py`` and ``unimatch.py``): the confidence threshold, the CutMix box that pastes a
second unlabeled batch (the *mix* batch) into each strong view, the mix batch's pseudo-labels
from the model in eval mode, and the loss on the confident pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semibench.errors import ConfigError, TrainingError
from semibench.losses import CONFIDENT_LOSSES, cutmix_box_masks, paste, pseudo_labels
from semibench.method import Batch, predicting


@dataclass
class WeakToStrongHparams:
    conf_thresh: float = 0.95  # cfg['conf_thresh'] (configs/pascal.yaml, acdc.yaml)
    cutmix_p: float = 0.5  # obtain_cutmix_box(p=0.5) (dataset/transform.py)
    cutmix_area: tuple[float, float] = (0.02, 0.4)  # size_min, size_max (fraction of the image)
    cutmix_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # ratio_1, ratio_2 (aspect ratio)
    unsup_loss: str = "ce"  # "ce": the natural-image code; "dice": the medical code's soft Dice

    def __post_init__(self):
        name = type(self).__name__
        if not 0.0 <= self.conf_thresh <= 1.0:
            raise ConfigError(f"{name}: conf_thresh must be in [0, 1], got {self.conf_thresh}")
        if not 0.0 <= self.cutmix_p <= 1.0:
            raise ConfigError(f"{name}: cutmix_p must be in [0, 1], got {self.cutmix_p}")
        self.cutmix_area = _range(name, "cutmix_area", self.cutmix_area, 0.0, 1.0)
        self.cutmix_ratio = _range(name, "cutmix_ratio", self.cutmix_ratio, 0.0, float("inf"))
        if self.unsup_loss not in CONFIDENT_LOSSES:
            raise ConfigError(f"{name}: unsup_loss must be one of {', '.join(CONFIDENT_LOSSES)}, "
                              f"got {self.unsup_loss!r}")


def _range(name: str, key: str, value, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {key} must be a pair [low, high], got {value!r}") from None
    if not lo < a <= b <= hi:
        raise ConfigError(f"{name}: {key} must satisfy {lo:g} < low <= high <= {hi:g}, got {[a, b]}")
    return a, b


def unlabeled_and_mix(batch: Batch, method: str, strong_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """The views of the unlabeled batch and of the mix batch (the engine's unlabeled batches 0
    and 1)."""
    views = batch.unlabeled_batches()
    need = {"weak", *strong_keys}
    if len(views) < 2 or any(need - set(v) for v in views[:2]):
        raise TrainingError(f"{method} needs two unlabeled batches with views {', '.join(sorted(need))}; "
                            f"the batch has {len(views)} ({'; '.join(','.join(v) for v in views)})")
    return views[0], views[1]


def mix_pseudo_labels(net: nn.Module, x_w_mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels (class, confidence) of the mix batch's weak view by ``net`` in eval mode,
    as the official code does before its training-mode forward."""
    with predicting(net):
        return pseudo_labels(net(x_w_mix, project=False).logits)


def cutmix_strong_view(hp: WeakToStrongHparams, x_s: torch.Tensor, x_s_mix: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the strong view with the mix batch's strong view pasted inside a CutMix box, the box)."""
    b, _, h, w = x_s.shape
    box = cutmix_box_masks(b, h, w, hp.cutmix_p, hp.cutmix_area, hp.cutmix_ratio,
                           device=x_s.device, dtype=x_s.dtype)
    return paste(box, x_s, x_s_mix), box


def pasted_targets(box: torch.Tensor, weak: tuple[torch.Tensor, torch.Tensor],
                   mix: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The strong view's targets: the weak view's (class, confidence), the mix batch's inside
    the box that mixed the image."""
    return paste(box, weak[0], mix[0]), paste(box, weak[1], mix[1])


def confident_loss(hp: WeakToStrongHparams, logits: torch.Tensor,
                   targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss of ``logits`` against the pseudo-labels on the pixels whose confidence reaches
    ``conf_thresh`` (CE normalised by all pixels, or the soft Dice of the kept pixels)."""
    label, conf = targets
    return CONFIDENT_LOSSES[hp.unsup_loss](logits, label, conf >= hp.conf_thresh)


def confident_fraction(hp: WeakToStrongHparams, conf: torch.Tensor) -> torch.Tensor:
    """The fraction of the weak view's pixels above the threshold (the official log's "Mask")."""
    return (conf >= hp.conf_thresh).float().mean()
