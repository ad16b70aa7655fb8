"""Loss pieces shared by several methods: one home, so that two methods that use "the same"
consistency term really compute the same thing.

- :func:`cross_entropy`: pixel-wise cross-entropy on logits, in float32, and
  :func:`supervised_loss`: that of a student on the labeled batch (the L_sup of every method);
- :func:`softmax_mse`: mean over (B, C, H, W) of the squared difference of the class
  probabilities, the teacher side detached, optionally over valid pixels only (Mean Teacher,
  TCSMv2, CCT);
- :func:`flip_rot` / :func:`flip_rot_inverse`: a per-sample flip of the H axis then
  ``rot90`` by k quarter turns, and its exact inverse (TCSMv2), on any (B, ..., H, W) tensor;
- :func:`box_masks`: CutMix rectangles, one box per sample of a fixed area fraction with a random
  aspect ratio, fully inside the image.

Randomness comes from an optional ``torch.Generator`` (else the global RNG, which the engine
re-seeds at every epoch, so a method's draws are reproducible and survive a resume).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel-wise cross-entropy of (B, C, H, W) logits against (B, H, W) class indices,
    computed in float32 (under AMP the logits are float16)."""
    return F.cross_entropy(logits.float(), target)


def supervised_loss(student: torch.nn.Module, batch) -> torch.Tensor:
    """L_sup: :func:`cross_entropy` of ``student`` on ``batch.labeled_image`` against
    ``batch.labeled_mask`` (no projection head)."""
    return cross_entropy(student(batch.labeled_image, project=False).logits, batch.labeled_mask)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """mean over B, C, H, W of (softmax(student) − softmax(teacher))², float32; no gradient
    flows into the teacher side. With ``valid`` ((B, 1, H, W) or (B, H, W), 0/1) the mean runs
    over the valid pixels only: Σ valid·Δp² / (C · Σ valid), 0 (on the graph) when none is."""
    p_s = torch.softmax(student_logits.float(), dim=1)
    p_t = torch.softmax(teacher_logits.detach().float(), dim=1)
    if valid is None:
        return F.mse_loss(p_s, p_t)
    v = valid.detach().float()
    v = v[:, None] if v.dim() == 3 else v
    sq = (p_s - p_t).pow(2) * v
    return sq.sum() / (v.sum() * p_s.shape[1]).clamp(min=1.0)


def _per_sample(x: torch.Tensor, flip: torch.Tensor, k: torch.Tensor, fn) -> torch.Tensor:
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"flip/rot90 needs square maps (a quarter turn swaps H and W), got "
                         f"{tuple(x.shape[-2:])}")
    flip, k = torch.as_tensor(flip).flatten(), torch.as_tensor(k).flatten()
    if len(flip) != len(x) or len(k) != len(x):
        raise ValueError(f"need one flip and one k per sample: batch {len(x)}, got {len(flip)} and {len(k)}")
    return torch.stack([fn(x[i], bool(flip[i]), int(k[i]) % 4) for i in range(len(x))])


def flip_rot(x: torch.Tensor, flip: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per sample i: flip the H axis if ``flip[i]``, then rotate by ``k[i]`` quarter turns
    (``torch.rot90`` over (H, W)). A new tensor; ``x`` is left untouched."""
    def fwd(xi, f, kk):
        xi = torch.flip(xi, [-2]) if f else xi
        return torch.rot90(xi, kk, dims=(-2, -1))
    return _per_sample(x, flip, k, fwd)


def flip_rot_inverse(x: torch.Tensor, flip: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`flip_rot` with the same ``flip`` and ``k``: rotate back,
    then undo the flip."""
    def back(xi, f, kk):
        xi = torch.rot90(xi, kk, dims=(-1, -2))
        return torch.flip(xi, [-2]) if f else xi
    return _per_sample(x, flip, k, back)


def sample_flip_rot(batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform per-sample flip ∈ {0, 1} and k ∈ {0, 1, 2, 3} (8 combinations)."""
    flip = torch.randint(0, 2, (batch,), generator=generator).bool()
    k = torch.randint(0, 4, (batch,), generator=generator)
    return flip.to(device), k.to(device)


def box_boxes(batch: int, height: int, width: int, area: float = 0.5,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, 4) long boxes (top, left, h, w): area fraction ``area`` (up to rounding), random
    aspect ratio, fully inside the image. CutMix-Seg's ``BoxMaskGenerator`` with one box,
    ``prop_by_area`` and ``within_bounds``: y_prop = exp(u·ln a) ∈ [a, 1], x_prop = a / y_prop."""
    if not 0.0 < area <= 1.0:
        raise ValueError(f"box area fraction must be in (0, 1], got {area}")
    u = torch.rand(batch, 3, generator=generator, dtype=torch.float64)
    y_prop = torch.exp(u[:, 0] * math.log(area))
    x_prop = area / y_prop
    h = torch.round(y_prop * height).long().clamp(0, height)
    w = torch.round(x_prop * width).long().clamp(0, width)
    top = torch.round((height - h) * u[:, 1]).long()
    left = torch.round((width - w) * u[:, 2]).long()
    return torch.stack([top, left, h, w], dim=1)


def box_masks(batch: int, height: int, width: int, area: float = 0.5,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 1, H, W) masks, 1 inside one box per sample (see :func:`box_boxes`), 0 outside."""
    boxes = box_boxes(batch, height, width, area, generator)
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    t, l_, h, w = (boxes[:, i, None, None] for i in range(4))
    inside = (rows >= t) & (rows < t + h) & (cols >= l_) & (cols < l_ + w)
    return inside[:, None].to(device=device, dtype=dtype)


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CutMix: ``mask`` · b + (1 − mask) · a (the box takes image b)."""
    return mask * b + (1 - mask) * a
