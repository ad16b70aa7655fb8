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
  aspect ratio, fully inside the image (CutMix-Seg);
- :func:`cutmix_box_masks`: FixMatch's and UniMatch's CutMix box (present with probability p,
  random area and aspect ratio), :func:`paste`: one batch pasted into another inside boxes;
- weak-to-strong pseudo-labels (FixMatch, UniMatch): :func:`pseudo_labels` (argmax and
  confidence), and the confident-pixel losses :func:`masked_cross_entropy` and
  :func:`masked_soft_dice` (:data:`CONFIDENT_LOSSES`).

Randomness comes from an optional ``torch.Generator`` (else the global RNG, which the engine
re-seeds at every epoch, so a method's draws are reproducible and survive a resume).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from semibench.train.execution import to_device  # CPU-drawn boxes and flips to the GPU without a host sync


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
    return to_device(flip, torch.device(device)), to_device(k, torch.device(device))


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
    return to_device(inside[:, None], torch.device(device), dtype)


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CutMix: ``mask`` · b + (1 − mask) · a (the box takes image b)."""
    return mask * b + (1 - mask) * a


CUTMIX_TRIES = 200  # box draws per sample; the first that fits is taken (rejection sampling)


def cutmix_box_masks(batch: int, height: int, width: int, p: float = 0.5,
                     area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3),
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 1, H, W) 0/1 masks of UniMatch's ``obtain_cutmix_box``: with probability ``p`` one
    box, else none. The box covers s·H·W pixels, s ~ U(area); its aspect ratio r ~ U(ratio) gives
    width ⌊√(s·H·W / r)⌋ and height ⌊√(s·H·W·r)⌋; its top-left corner is uniform over the
    image, and (r, corner) are drawn again until the box fits inside. Here the redraws are a
    fixed :data:`CUTMIX_TRIES` candidates per sample, the first that fits taken (the same
    distribution; the random stream has a fixed length); in the rare case that none fits, the
    last candidate is moved (and cut) to fit."""
    n = CUTMIX_TRIES
    present = torch.rand(batch, generator=generator, dtype=torch.float64) < p
    s = area[0] + (area[1] - area[0]) * torch.rand(batch, 1, generator=generator, dtype=torch.float64)
    r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(batch, n, generator=generator, dtype=torch.float64)
    left = (torch.rand(batch, n, generator=generator, dtype=torch.float64) * width).long()
    top = (torch.rand(batch, n, generator=generator, dtype=torch.float64) * height).long()
    pixels = s * height * width
    w = torch.sqrt(pixels / r).long()
    h = torch.sqrt(pixels * r).long()
    fits = (left + w <= width) & (top + h <= height)
    pick = torch.where(fits.any(1), fits.long().argmax(1), n - 1)[:, None]
    w, h = w.gather(1, pick)[:, 0].clamp(max=width), h.gather(1, pick)[:, 0].clamp(max=height)
    left = torch.minimum(left.gather(1, pick)[:, 0], width - w)
    top = torch.minimum(top.gather(1, pick)[:, 0], height - h)
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    t, l_, h, w = (v[:, None, None] for v in (top, left, h, w))
    inside = (rows >= t) & (rows < t + h) & (cols >= l_) & (cols < l_ + w) & present[:, None, None]
    return to_device(inside[:, None], torch.device(device), dtype)


def paste(box: torch.Tensor, into: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``source`` inside the box, ``into`` outside, for images (B, C, H, W) and per-pixel maps
    (B, H, W) of any dtype; ``box`` is (B, 1, H, W) or (B, H, W), 0/1."""
    inside = box.bool()
    if into.dim() == 3 and inside.dim() == 4:
        inside = inside[:, 0]
    return torch.where(inside.to(into.device), source, into)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax class, max softmax probability) per pixel of (B, C, H, W) logits, float32, no
    gradient."""
    p = torch.softmax(logits.detach().float(), dim=1)
    conf, label = p.max(dim=1)
    return label, conf


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ over pixels of CE · keep, divided by the number of *all* pixels (B·H·W), not by the kept
    ones: FixMatch's and UniMatch's normalisation, so few confident pixels give a small loss."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * keep.float()).sum() / target.numel()


def masked_soft_dice(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                     smooth: float = 1e-5) -> torch.Tensor:
    """UniMatch's medical variant: the mean over classes c of 1 − (2 Σ p_c t_c + ε) /
    (Σ p_c² + Σ t_c² + ε), sums over the kept pixels of the whole batch, p = softmax(logits),
    t one-hot, ε = 1e-5 (SSL4MIS ``DiceLoss`` with ``ignore``). No kept pixel gives 0."""
    p = torch.softmax(logits.float(), dim=1)
    t = F.one_hot(target, p.shape[1]).permute(0, 3, 1, 2).float()
    k = keep.float()[:, None]
    inter = (p * t * k).sum((0, 2, 3))
    denom = (p * p * k).sum((0, 2, 3)) + (t * t * k).sum((0, 2, 3))
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


CONFIDENT_LOSSES = {"ce": masked_cross_entropy, "dice": masked_soft_dice}
