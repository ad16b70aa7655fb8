"""CCT's seven feature perturbations (Ouali et al., CVPR 2020; official code ``yassouali/CCT``
``models/decoders.py``), as functions on the (B, C, h, w) extractor features.

Random draws use the global torch RNG (the engine re-seeds it at every epoch, so runs are
reproducible and survive a resume); tests pass the random parts explicitly where it matters.
The guided perturbations take the main head's (detached) logits at any resolution; their masks
are computed there and nearest-resized to the features, as the official code does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# ---------------------------------------------------------------------------- VAT


def l2_normalise(d: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """``d`` scaled to unit L2 norm per sample (over all non-batch axes).

    Each sample is first divided by its largest |value|, so a gradient of 1e-20 still normalises
    exactly instead of underflowing when squared (the official ``_l2_normalize`` divides by
    ``norm + 1e-8`` instead, which shrinks such a gradient to almost nothing, see cct.py).
    A sample that is all zeros takes ``fallback`` (normalised) when given, else stays zero."""
    flat = d.flatten(1)
    peak = flat.abs().amax(1, keepdim=True)
    unit = flat / torch.where(peak > 0, peak, torch.ones_like(peak))
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(torch.finfo(unit.dtype).tiny)
    if fallback is not None:
        unit = torch.where(peak > 0, unit, l2_normalise(fallback).flatten(1))
    return unit.view_as(d)


def vat_perturbation(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     xi: float = 1e-6, eps: float = 2.0, iterations: int = 1) -> torch.Tensor:
    """The adversarial perturbation ``r_adv`` (same shape as ``features``, norm ``eps`` per
    sample; constant, no graph) of CCT's ``get_r_adv``: start from d ~ U(−0.5, 0.5), normalised;
    per power iteration d ← n(∇_d KL(softmax(head(h)) ‖ softmax(head(h + ξ·d)))) with h the
    detached features and KL summed over classes and pixels, averaged over the batch.

    The gradient is taken with ``torch.autograd.grad`` (no ``.backward()``, so no parameter's
    ``.grad`` is touched) in float32 with autocast off. ``head`` must be deterministic (the
    caller runs it in eval mode), or the two passes would differ by more than ξ·d."""
    h = features.detach().float()
    with torch.autocast(device_type=h.device.type, enabled=False), torch.enable_grad():
        with torch.no_grad():
            p = torch.softmax(head(h).float(), dim=1)
        d = l2_normalise(torch.rand_like(h) - 0.5)
        for _ in range(iterations):
            d = d.detach().requires_grad_(True)
            log_p_hat = F.log_softmax(head(h + xi * d).float(), dim=1)
            distance = F.kl_div(log_p_hat, p, reduction="batchmean")
            (grad,) = torch.autograd.grad(distance, d)
            # all zeros where ξ·d is below float32 resolution everywhere: keep the current d
            d = l2_normalise(grad, fallback=d.detach())
    return (eps * d).detach()


# ---------------------------------------------------------------------------- random ones


def dropout(features: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Channel-wise (spatial) dropout, kept channels scaled by 1/(1 − p) (``nn.Dropout2d``)."""
    return F.dropout2d(features, p=p, training=True)


def feature_drop(features: torch.Tensor, u: float | None = None, low: float = 0.7,
                 high: float = 0.9) -> torch.Tensor:
    """F-Drop: a = mean over channels; per sample thr = u · max a; zero every position with
    a ≥ thr. One u ~ U(low, high) per call, shared by the batch (as the official code)."""
    if u is None:
        u = float(torch.empty(()).uniform_(low, high))
    attention = features.mean(dim=1, keepdim=True)
    threshold = attention.flatten(1).amax(1).view(-1, 1, 1, 1) * u
    return features * (attention < threshold).to(features.dtype)


def feature_noise(features: torch.Tensor, magnitude: float = 0.3,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """F-Noise: h + h ⊙ N with N ~ U(−magnitude, magnitude) of shape (C, h, w), shared by the
    batch (as the official code)."""
    if noise is None:
        noise = torch.empty(features.shape[1:], device=features.device).uniform_(-magnitude, magnitude)
    return features + features * noise.to(features.dtype).unsqueeze(0)


# ---------------------------------------------------------------------------- guided ones


def object_mask(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, 1, *size) float mask, 1 where the argmax class is not background (class 0), computed
    at the logits' resolution and nearest-resized to ``size``."""
    mask = (logits.detach().argmax(1, keepdim=True) > 0).float()
    return F.interpolate(mask, size=tuple(size), mode="nearest")


def context_masking(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Con-Msk: keep the predicted objects, remove their context."""
    return features * object_mask(logits, features.shape[-2:]).to(features.dtype)


def object_masking(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Obj-Msk: keep the context, remove the predicted objects (the complement of Con-Msk)."""
    return features * (1 - object_mask(logits, features.shape[-2:])).to(features.dtype)


def object_boxes(logits: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per sample, the bounding boxes (top, left, bottom, right; inclusive pixel coordinates) of
    the 8-connected components of the predicted non-background mask at the logits' resolution:
    the objects whose outer contours ``cv2.findContours(RETR_EXTERNAL)`` returns (holes are
    inside their component's box). Computed once per step and shared by the cutout heads."""
    masks = (logits.detach().argmax(1) > 0).cpu().numpy()
    eight = np.ones((3, 3), dtype=bool)
    out = []
    for m in masks:
        labels, _ = ndimage.label(m, structure=eight)
        out.append([(s[0].start, s[1].start, s[0].stop - 1, s[1].stop - 1)
                    for s in ndimage.find_objects(labels) if s is not None])
    return out


def cutout_keep_mask(boxes: list[list[tuple[int, int, int, int]]], full_size, size,
                     erase: float = 0.4, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, *size) float mask of G-Cutout: for each object box with extents (bb_h, bb_w) =
    (bottom − top, right − left) as the official code measures them from contour points, zero
    an ``int(erase·bb_h) × int(erase·bb_w)`` box at a uniformly drawn offset in
    [0, int((1 − erase)·bb)] inside it; built at ``full_size`` and nearest-resized to ``size``."""
    keep = torch.ones(len(boxes), 1, *tuple(full_size))
    for i, sample in enumerate(boxes):
        for top, left, bottom, right in sample:
            bb_h, bb_w = bottom - top, right - left
            dy = int(torch.randint(0, int(bb_h * (1 - erase)) + 1, ()))
            dx = int(torch.randint(0, int(bb_w * (1 - erase)) + 1, ()))
            y0, x0 = top + dy, left + dx
            keep[i, 0, y0:y0 + int(bb_h * erase), x0:x0 + int(bb_w * erase)] = 0
    return F.interpolate(keep, size=tuple(size), mode="nearest").to(device)


def guided_cutout(features: torch.Tensor, logits: torch.Tensor, erase: float = 0.4,
                  boxes: list | None = None) -> torch.Tensor:
    """G-Cutout: erase a random box of ``erase`` of each predicted object's extent."""
    if boxes is None:
        boxes = object_boxes(logits)
    keep = cutout_keep_mask(boxes, logits.shape[-2:], features.shape[-2:], erase, features.device)
    return features * keep.to(features.dtype)
