"""The paper's six training augmentations (Sec. 4.1: random flip, random crop, rotation in
[-15°, 15°], Gaussian blur, colour jitter, greyscale) on batched tensors.

Every random number is drawn on the CPU from an explicit ``torch.Generator`` in a fixed order
(all parameters are drawn whether or not a transform fires), so the same generator seed gives the
same views on any machine and device; the tensor work itself runs on the batch's device.

- *Geometric* (flip, crop, rotation) is one affine warp per sample: flips, then rotation about the
  crop centre, then a crop of side ``s`` (fraction of the image) resized back to the input size.
  Images are sampled bilinearly, masks with nearest neighbour, both through the same grid, with
  reflection padding (the corners a rotation uncovers mirror the tissue rather than go black).
- *Photometric* (colour jitter → greyscale → Gaussian blur, SimCLR's order) changes pixel values
  only, so a photometric view stays pixel-aligned with its geometric source.

Inputs are uint8 (B, 3, H, W) images and (B, H, W) masks; outputs are float images normalised
with ImageNet statistics (as :func:`semibench.data.loading.preprocess`) and long masks.

Unlabeled *view kinds* are built by name (:data:`VIEW_KINDS`, :func:`make_views`); a method names
the kind it wants in ``Method.unlabeled_views``:

- ``"single"``: ``{"image"}``, the labeled pipeline's augmentation;
- ``"weak_strong"``: ``{"weak", "strong"}``, the same geometric warp, ``strong`` adds photometric
  changes: the two are pixel-aligned; with the option ``strong_views=n`` also ``strong_2`` …
  ``strong_n``, each its own draw of photometric changes of the same weak view (UniMatch's two
  strong views), drawn after the first so that ``strong`` is the same for every n;
- ``"two_crops"``: ``{"crop1", "crop2", "box1", "box2", "flip1", "flip2"}``, two overlapping
  square crops of one image (CAC's pair sampling, :func:`sample_crop_pair`): side
  :func:`two_crop_size`, no resizing, offset between the crops a multiple of the method's
  ``stride`` (``Method.view_options``), overlap IoU within ``iou``; each crop then gets its own
  random flips (``flipK``: (B, 2) bool, column 0 = left-right, column 1 = up-down) and its own
  photometric changes. ``boxK`` is the overlap in crop K's *unflipped* coordinates as (top,
  left, bottom, right), bottom/right exclusive, every entry a multiple of ``stride``: undo the
  flips of a crop (or of its feature map) first, then ``crop1[..., t1:b1, l1:r1]`` and
  ``crop2[..., t2:b2, l2:r2]`` show the same pixels before photometric changes, and
  ``box // stride`` slices a 1/stride feature map exactly.

A method passes options to its view kind with the class attribute ``Method.view_options``
(a dict of keyword arguments of the builder, e.g. ``{"stride": 8}``).

The paper gives no magnitudes; the defaults in :class:`AugmentConfig` are our choice (SimCLR's
colour strengths, a mild crop) and are documented there. A run's config overrides any of them
under ``train.augment`` (:func:`augment_config` checks the values).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from semibench.data.loading import IMAGENET_MEAN, IMAGENET_STD
from semibench.errors import ConfigError
from semibench.train.execution import to_device  # small CPU-made tensors to the GPU without a host sync


@dataclass(frozen=True)
class AugmentConfig:
    hflip_p: float = 0.5
    vflip_p: float = 0.5  # nuclei have no up/down: vertical flips are as valid as horizontal ones
    crop_scale: tuple[float, float] = (0.7, 1.0)  # side of the random crop / image side
    rotation_deg: float = 15.0  # paper: rotation in [-15°, 15°]
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor in [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of a full turn of the chroma plane, in [-h, h]
    grey_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels
    labeled_photometric: bool = True  # labeled images get all six augmentations
    two_crop_frac: float = 0.7  # crop side / image side, rounded down to a multiple of 32


_PROBABILITIES = {"hflip_p", "vflip_p", "jitter_p", "grey_p", "blur_p"}
_RANGES = {"crop_scale": (0.0, 1.0), "blur_sigma": (0.0, math.inf)}  # (lo, hi) pairs and their bounds
_FRACTIONS = {"two_crop_frac", "hue"}


def augment_config(overrides: Mapping[str, Any] | None = None) -> AugmentConfig:
    """:class:`AugmentConfig` with ``overrides`` (the config's ``train.augment``) applied and
    checked: unknown names, probabilities outside [0, 1] and reversed ranges are refused."""
    overrides = dict(overrides or {})
    known = {f.name: f for f in fields(AugmentConfig)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown train.augment option(s): {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name, v in overrides.items():
        where = f"train.augment.{name}"
        if name == "labeled_photometric":
            if not isinstance(v, bool):
                raise ConfigError(f"{where} must be true or false, got {v!r}")
        elif name in _RANGES:
            if (not isinstance(v, (list, tuple)) or len(v) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise ConfigError(f"{where} must be a pair [low, high] of numbers, got {v!r}")
            lo_bound, hi_bound = _RANGES[name]
            v = (float(v[0]), float(v[1]))
            if not lo_bound < v[0] <= v[1] <= hi_bound:
                raise ConfigError(f"{where} must satisfy {lo_bound:g} < low <= high <= {hi_bound:g}, got {list(v)}")
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{where} must be a number >= 0, got {v!r}")
            v = float(v)
            if (name in _PROBABILITIES or name in _FRACTIONS) and v > 1:
                raise ConfigError(f"{where} must be at most 1, got {v:g}")
        values[name] = v
    return replace(AugmentConfig(), **values)


# ---------------------------------------------------------------------------- geometric

def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def sample_affine(n: int, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """(n, 2, 3) float64 ``affine_grid`` matrices mapping output to input coordinates in [-1, 1]:
    ``input = c + s * R(angle) * Flip * output``."""
    hflip = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.hflip_p
    vflip = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.vflip_p
    scale = _uniform(gen, n, *cfg.crop_scale)
    # the crop centre may move as far as keeps the (unrotated) crop inside the image
    cx = _uniform(gen, n, -1.0, 1.0) * (1.0 - scale)
    cy = _uniform(gen, n, -1.0, 1.0) * (1.0 - scale)
    angle = _uniform(gen, n, -cfg.rotation_deg, cfg.rotation_deg) * (math.pi / 180.0)
    fx = torch.where(hflip, -1.0, 1.0).double()
    fy = torch.where(vflip, -1.0, 1.0).double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = scale * cos * fx
    theta[:, 0, 1] = -scale * sin * fy
    theta[:, 1, 0] = scale * sin * fx
    theta[:, 1, 1] = scale * cos * fy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Apply per-sample affine matrices to a float (B, C, H, W) batch."""
    grid = F.affine_grid(to_device(theta, images.device, images.dtype), list(images.shape),
                         align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------------------- photometric

_LUMA = (0.299, 0.587, 0.114)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = to_device(torch.tensor(_LUMA, dtype=x.dtype), x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) RGB→RGB hue rotations: rotate the chroma plane (I, Q) of YIQ by ``turns``."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    a = turns.double() * 2 * math.pi
    rot = torch.zeros(len(a), 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(a), -torch.sin(a)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(a), torch.cos(a)
    return yiq2rgb @ rot @ rgb2yiq


@dataclass
class PhotometricParams:
    jitter: torch.Tensor  # (n,) bool
    brightness: torch.Tensor  # (n,) factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # (n,) turns
    grey: torch.Tensor  # (n,) bool
    blur: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,) pixels


def sample_photometric(n: int, gen: torch.Generator, cfg: AugmentConfig) -> PhotometricParams:
    u = lambda: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    return PhotometricParams(
        jitter=u() < cfg.jitter_p,
        brightness=_uniform(gen, n, 1 - cfg.brightness, 1 + cfg.brightness),
        contrast=_uniform(gen, n, 1 - cfg.contrast, 1 + cfg.contrast),
        saturation=_uniform(gen, n, 1 - cfg.saturation, 1 + cfg.saturation),
        hue=_uniform(gen, n, -cfg.hue, cfg.hue),
        grey=u() < cfg.grey_p,
        blur=u() < cfg.blur_p,
        sigma=_uniform(gen, n, *cfg.blur_sigma),
    )


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 2 radius + 1) normalised 1-D Gaussian kernels, one per sigma."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x[None] / sigma.double()[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable per-sample Gaussian blur of a (B, C, H, W) batch, reflect padding."""
    b, c, h, w = x.shape
    k = to_device(gaussian_kernels(sigma, radius), x.device, x.dtype)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def photometric(x: torch.Tensor, p: PhotometricParams, cfg: AugmentConfig) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation, hue; fixed order), greyscale, blur on
    float images in [0, 1]; each step clamps to [0, 1]."""
    dev, dt = x.device, x.dtype
    col = lambda t: to_device(t, dev, dt).view(-1, 1, 1, 1)  # noqa: E731
    jit = to_device(p.jitter, dev).view(-1, 1, 1, 1)
    y = (x * col(p.brightness)).clamp(0, 1)
    mean = _grey(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * col(p.contrast) + mean).clamp(0, 1)
    g = _grey(y)
    y = ((y - g) * col(p.saturation) + g).clamp(0, 1)
    m = to_device(_hue_matrices(p.hue), dev, dt)
    y = torch.einsum("bij,bjhw->bihw", m, y).clamp(0, 1)
    x = torch.where(jit, y, x)
    x = torch.where(to_device(p.grey, dev).view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
    radius = max(1, math.ceil(3 * cfg.blur_sigma[1]))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs pad < size
    if bool(p.blur.any()):
        x = torch.where(to_device(p.blur, dev).view(-1, 1, 1, 1), gaussian_blur(x, p.sigma, radius), x)
    return x


# ---------------------------------------------------------------------------- pipelines

def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = to_device(torch.tensor(IMAGENET_MEAN, dtype=x.dtype), x.device).view(1, 3, 1, 1)
    std = to_device(torch.tensor(IMAGENET_STD, dtype=x.dtype), x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_labeled(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator,
                    cfg: AugmentConfig = AugmentConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) and masks (B, H, W) → normalised images, long masks; the
    geometric warp is the same for an image and its mask."""
    n = images.shape[0]
    theta = sample_affine(n, gen, cfg)
    pp = sample_photometric(n, gen, cfg)
    x = warp(to_float(images), theta, "bilinear")
    y = warp(masks[:, None].float(), theta, "nearest")[:, 0].round().long()
    if cfg.labeled_photometric:
        x = photometric(x, pp, cfg)
    return normalise(x), y


def _single(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> dict[str, torch.Tensor]:
    n = images.shape[0]
    theta = sample_affine(n, gen, cfg)
    pp = sample_photometric(n, gen, cfg)
    x = warp(to_float(images), theta)
    if cfg.labeled_photometric:
        x = photometric(x, pp, cfg)
    return {"image": normalise(x)}


def _weak_strong(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, *,
                 strong_views: int = 1) -> dict[str, torch.Tensor]:
    if isinstance(strong_views, bool) or not isinstance(strong_views, int) or strong_views < 1:
        raise ConfigError(f"weak_strong strong_views must be an integer >= 1, got {strong_views!r}")
    n = images.shape[0]
    theta = sample_affine(n, gen, cfg)
    params = [sample_photometric(n, gen, cfg) for _ in range(strong_views)]
    weak = warp(to_float(images), theta)
    views = {"weak": normalise(weak)}
    for i, pp in enumerate(params, start=1):
        views["strong" if i == 1 else f"strong_{i}"] = normalise(photometric(weak, pp, cfg))
    return views


def two_crop_size(size: int, cfg: AugmentConfig, stride: int = 1) -> int:
    """Crop side: a multiple of 32 (the encoder's total stride) and of ``stride``, no larger
    than the image."""
    m = math.lcm(32, int(stride))
    c = int(size * cfg.two_crop_frac) // m * m
    return max(min(c, size), min(m, size))


def _randint(gen: torch.Generator, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per-element uniform integers in [lo, hi] (inclusive)."""
    u = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
    return torch.minimum(lo + (u * (hi - lo + 1).double()).floor().long(), hi)


PAIR_TRIES = 50  # CAC's PairVOCDataset: 50 draws of crop 2, then crop 2 = crop 1


def sample_crop_pair(n: int, size: int, crop: int, stride: int, iou: tuple[float, float],
                     gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Top-left corners (y1, x1, y2, x2), each (n,) long, of two ``crop``-sided crops of a
    ``size``-sided image, as CAC's ``PairVOCDataset``: crop 1 uniform; crop 2 uniform, its
    offset to crop 1 floored to a multiple of ``stride`` (plus ``stride`` when that leaves the
    image), accepted when the crops overlap with IoU = inter / (2 crop² − inter) in ``iou``;
    the first of :data:`PAIR_TRIES` draws that passes, else crop 2 = crop 1. A fixed number of
    random numbers is drawn, so the stream stays aligned whatever is accepted."""
    hi = torch.full((n,), size - crop, dtype=torch.long)
    y1, x1 = _randint(gen, hi * 0, hi), _randint(gen, hi * 0, hi)
    hi_t = hi[:, None].expand(n, PAIR_TRIES)
    cy, cx = _randint(gen, hi_t * 0, hi_t), _randint(gen, hi_t * 0, hi_t)

    def snap(c, c1):
        c2 = torch.div(c - c1[:, None], stride, rounding_mode="floor") * stride + c1[:, None]
        return torch.where(c2 < 0, c2 + stride, c2)

    y2, x2 = snap(cy, y1), snap(cx, x1)
    ih = crop - (y2 - y1[:, None]).abs()
    iw = crop - (x2 - x1[:, None]).abs()
    inter = (ih.clamp(min=0) * iw.clamp(min=0)).double()
    ratio = inter / (2 * crop * crop - inter)
    ok = ((ih > 0) & (iw > 0) & (ratio >= iou[0]) & (ratio <= iou[1])
          & (y2 >= 0) & (y2 <= size - crop) & (x2 >= 0) & (x2 <= size - crop))
    first = torch.where(ok.any(1), ok.long().argmax(1), -1)  # the first accepted draw
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    y2 = torch.where(first >= 0, y2[rows, pick], y1)
    x2 = torch.where(first >= 0, x2[rows, pick], x1)
    return y1, x1, y2, x2


def undo_flips(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Undo (equivalently: apply) a ``two_crops`` view's per-sample flips on a (B, ..., H, W)
    tensor; ``flip`` is (B, 2) bool: left-right, up-down."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    lr, ud = to_device(flip[:, 0], x.device).view(shape), to_device(flip[:, 1], x.device).view(shape)
    x = torch.where(lr, x.flip(-1), x)
    return torch.where(ud, x.flip(-2), x)


def _two_crops(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, *, stride: int = 1,
               iou: tuple[float, float] = (0.1, 1.0)) -> dict[str, torch.Tensor]:
    n, _, h, w = images.shape
    if h != w:
        raise ConfigError(f"two_crops expects square images, got {h}x{w}")
    if not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"two_crops stride must be an integer >= 1, got {stride!r}")
    if not (len(iou) == 2 and 0.0 <= iou[0] <= iou[1] <= 1.0):
        raise ConfigError(f"two_crops iou must be a range [low, high] within [0, 1], got {iou!r}")
    c = two_crop_size(h, cfg, stride)
    y1, x1, y2, x2 = sample_crop_pair(n, h, c, stride, iou, gen)
    flips = [torch.stack([torch.rand(n, generator=gen, dtype=torch.float64) < cfg.hflip_p,
                          torch.rand(n, generator=gen, dtype=torch.float64) < cfg.vflip_p], 1)
             for _ in range(2)]
    p1, p2 = sample_photometric(n, gen, cfg), sample_photometric(n, gen, cfg)
    x = to_float(images)
    dev = x.device
    crop1 = torch.stack([x[i, :, y1[i]:y1[i] + c, x1[i]:x1[i] + c] for i in range(n)])
    crop2 = torch.stack([x[i, :, y2[i]:y2[i] + c, x2[i]:x2[i] + c] for i in range(n)])
    crop1, crop2 = undo_flips(crop1, flips[0]), undo_flips(crop2, flips[1])
    # overlap in image coordinates, then in each crop's (unflipped) coordinates
    ot, ol = torch.maximum(y1, y2), torch.maximum(x1, x2)
    ob, orr = torch.minimum(y1, y2) + c, torch.minimum(x1, x2) + c
    box1 = torch.stack([ot - y1, ol - x1, ob - y1, orr - x1], 1)
    box2 = torch.stack([ot - y2, ol - x2, ob - y2, orr - x2], 1)
    return {"crop1": normalise(photometric(crop1, p1, cfg)), "crop2": normalise(photometric(crop2, p2, cfg)),
            "box1": to_device(box1, dev), "box2": to_device(box2, dev), "flip1": to_device(flips[0], dev),
            "flip2": to_device(flips[1], dev)}


ViewBuilder = Callable[[torch.Tensor, torch.Generator, AugmentConfig], dict[str, torch.Tensor]]
VIEW_KINDS: dict[str, ViewBuilder] = {
    "single": _single,
    "weak_strong": _weak_strong,
    "two_crops": _two_crops,
}


def register_view_kind(name: str) -> Callable[[ViewBuilder], ViewBuilder]:
    """Add a view kind (for a future method whose views none of the above fits)."""
    def decorator(fn: ViewBuilder) -> ViewBuilder:
        if name in VIEW_KINDS and VIEW_KINDS[name] is not fn:
            raise ConfigError(f"view kind {name!r} is registered twice")
        VIEW_KINDS[name] = fn
        return fn
    return decorator


def make_views(kind: str, images: torch.Tensor, gen: torch.Generator,
               cfg: AugmentConfig = AugmentConfig(), **options) -> dict[str, torch.Tensor]:
    """The unlabeled views of ``kind`` for a uint8 (B, 3, H, W) batch; ``options`` are the
    method's ``view_options`` (keyword arguments of the kind's builder)."""
    if kind not in VIEW_KINDS:
        raise ConfigError(f"unknown unlabeled view kind {kind!r}; known: {', '.join(sorted(VIEW_KINDS))}")
    if options:
        accepted = view_options_of(kind)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(f"view kind {kind!r} takes no option(s) {', '.join(unknown)}; "
                              f"it takes: {', '.join(sorted(accepted)) or 'none'}")
    return VIEW_KINDS[kind](images, gen, cfg, **options)


def view_options_of(kind: str) -> set[str]:
    """The options a view kind takes (its builder's keyword-only arguments)."""
    return {n for n, prm in inspect.signature(VIEW_KINDS[kind]).parameters.items()
            if prm.kind is inspect.Parameter.KEYWORD_ONLY}
