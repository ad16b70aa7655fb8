"""Procedurally generated nuclei with exact instance masks: the embedded default dataset (no
download; ``obtain`` and ``verify`` have nothing to fetch or check).

Two styles: ``fluorescence`` (bright nuclei on a dark background, grey or tinted) and ``he``
(purple, textured nuclei on pink tissue with pale lumen-like gaps). Nuclei are irregular ellipses
(random size, elongation, orientation and a few boundary harmonics); a share of them is placed
against an earlier nucleus so that touching nuclei are common. The label map is drawn first and
is the truth: the image is rendered from it (texture, blur, noise), never the other way round.
Where two shapes overlap the earlier nucleus keeps the pixels; a new nucleus is rejected if it
would lose more than 30 % of its area or its centre, and keeps only its connected part around its
centre, so every instance is one connected region.

Deterministic: image i depends only on (seed, i) and the options (numpy's PCG64 seeded with
SeedSequence([seed, i])), not on ``count`` or worker scheduling.

Config keys (``datasets.synthetic``), all optional:
``count`` (images, default 200), ``size`` (int or [height, width], default 256, at least 16),
``seed`` (default 0), ``styles`` (list from ``fluorescence``, ``he``; image i gets
styles[i mod len], default both), ``nuclei`` ([min, max] nuclei per 256x256 area, scaled by the
image area, default [8, 40]), ``radius`` ([min, max] mean nucleus radius in pixels, default
[4, 11]), ``touching`` (probability that a nucleus is placed against an earlier one, default
0.35), ``variation`` (scales the per-image spread of appearance: stain colours and background
level, blur and noise; default 1, which is the generator as it always was, draw for draw; larger
values make one labeled image cover less of the dataset's variety), ``workers``.
Sample ids: ``syn00000``, ``syn00001``, ... (subset ``train``; split 7 : 1 : 2 of the images).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import ndimage

from semibench.data.obtain import Recipe, SampleRef, parallel_map
from semibench.data.prepared import PreparedWriter
from semibench.data.splits import SplitPolicy
from semibench.errors import ConfigError
from semibench.registry import register_dataset

GENERATOR_VERSION = 1  # bump when the images a (seed, index) gives change
STYLES = ("fluorescence", "he")


@dataclass(frozen=True)
class Nucleus:
    id: int
    cy: float
    cx: float
    a: float  # semi-axes in pixels
    b: float
    angle: float


@dataclass
class SyntheticImage:
    image: np.ndarray  # HxWx3 uint8
    label: np.ndarray  # HxW int32, 0 = background, 1..N
    style: str
    nuclei: list[Nucleus] = field(default_factory=list)


def _nucleus_shape(rng, cy, cx, a, b, angle, height, width):
    """(top, left, bool mask) of an irregular ellipse, pixel centres inside the boundary."""
    amps = rng.uniform(0.0, 0.12, 3) * np.array([1.0, 0.6, 0.4])
    phases = rng.uniform(0.0, 2 * np.pi, 3)
    reach = max(a, b) * (1 + amps.sum()) + 1
    top, bottom = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach) + 1)
    left, right = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach) + 1)
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / a
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / b
    phi = np.arctan2(v, u)
    boundary = 1 + sum(amps[k] * np.cos((k + 2) * phi + phases[k]) for k in range(3))
    return top, left, np.hypot(u, v) <= boundary


def _place_nuclei(rng, height, width, n_target, radius, touching) -> tuple[np.ndarray, list[Nucleus]]:
    label = np.zeros((height, width), dtype=np.int32)
    nuclei: list[Nucleus] = []
    for _ in range(20 * n_target):
        if len(nuclei) >= n_target:
            break
        r = rng.uniform(*radius)
        elong = rng.uniform(1.0, 1.7)
        a, b, angle = r * math.sqrt(elong), r / math.sqrt(elong), rng.uniform(0, math.pi)
        if nuclei and rng.random() < touching:
            other = nuclei[int(rng.integers(len(nuclei)))]
            direction = rng.uniform(0, 2 * math.pi)
            dist = (r + math.sqrt(other.a * other.b)) * rng.uniform(0.8, 1.0)
            cy, cx = other.cy + dist * math.sin(direction), other.cx + dist * math.cos(direction)
        else:
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        pr, pc = math.floor(cy), math.floor(cx)
        if not (0 <= pr < height and 0 <= pc < width) or label[pr, pc] != 0:
            continue
        top, left, inside = _nucleus_shape(rng, cy, cx, a, b, angle, height, width)
        if not inside[pr - top, pc - left]:
            continue
        window = label[top:top + inside.shape[0], left:left + inside.shape[1]]
        free = inside & (window == 0)
        if inside.sum() < 4 or free.sum() < 0.7 * inside.sum():
            continue
        parts, _ = ndimage.label(free)
        k = len(nuclei) + 1
        window[parts == parts[pr - top, pc - left]] = k
        nuclei.append(Nucleus(k, cy, cx, a, b, angle))
    return label, nuclei


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-12)


def _render_fluorescence(rng, label, n, v=1.0) -> np.ndarray:
    h, w = label.shape
    background = rng.uniform(2, 25 * v)
    brightness = np.concatenate([[background], rng.uniform(70, 230, n)])
    texture = _smooth_noise(rng, (h, w), 1.5)
    inten = brightness[label] * np.where(label > 0, 1 + 0.15 * texture, 1.0)
    inten = ndimage.gaussian_filter(inten, rng.uniform(0.5, 0.5 + 1.1 * v))
    inten = inten + rng.normal(0, rng.uniform(1.5, 1.5 + 4.5 * v), (h, w))
    tint = np.array([1.0, 1.0, 1.0]) if rng.random() < 0.6 else np.array(
        [rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.8), 1.0])
    return np.clip(np.rint(inten[..., None] * tint), 0, 255).astype(np.uint8)


def _render_he(rng, label, n, v=1.0) -> np.ndarray:
    h, w = label.shape
    density = 0.55 * _smooth_noise(rng, (h, w), 8) + 0.3 * _smooth_noise(rng, (h, w), 2)
    tissue = np.clip(0.65 + 0.25 * density, 0, 1)
    tissue[_smooth_noise(rng, (h, w), 12) > 1.2] *= 0.15  # pale gaps (lumen, fat)
    white = np.array([245.0, 238, 242])
    eosin = np.array([222.0, 120, 172]) + rng.uniform(-15 * v, 15 * v, 3)
    img = white * (1 - tissue[..., None]) + eosin * tissue[..., None]
    haem = np.array([92.0, 55, 145]) + rng.uniform(-20 * v, 20 * v, 3)
    nuc_colour = np.concatenate([[haem], haem * rng.uniform(0.75, 1.2, (n, 1))])
    chromatin = _smooth_noise(rng, (h, w), 1.0)
    colour = nuc_colour[label] * (1 - 0.12 * chromatin[..., None])
    alpha = ndimage.gaussian_filter((label > 0).astype(np.float64), 0.7)[..., None]
    colour[label == 0] = haem  # only seen through the soft edge
    img = img * (1 - alpha) + colour * alpha
    img = ndimage.gaussian_filter(img, (rng.uniform(0.4, 0.4 + 0.6 * v),) * 2 + (0,))
    img = img + rng.normal(0, rng.uniform(2, 2 + 3 * v), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate(index: int, seed: int = 0, size: tuple[int, int] = (256, 256), style: str = "fluorescence",
             nuclei: tuple[int, int] = (8, 40), radius: tuple[float, float] = (4, 11),
             touching: float = 0.35, variation: float = 1.0) -> SyntheticImage:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))
    height, width = size
    scale = height * width / 65536
    lo, hi = (max(1, math.floor(v * scale + 0.5)) for v in nuclei)
    n_target = int(rng.integers(lo, max(lo, hi) + 1))
    label, placed = _place_nuclei(rng, height, width, n_target, radius, touching)
    render = _render_fluorescence if style == "fluorescence" else _render_he
    return SyntheticImage(render(rng, label, len(placed), variation), label, style, placed)


def _generate_task(args: tuple[int, dict]) -> tuple[int, np.ndarray, np.ndarray]:
    index, params = args
    s = generate(index, **params)
    return index, s.image, s.label


def _pair(value, key, cast) -> tuple:
    if isinstance(value, (int, float)) and key == "size":
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"datasets.synthetic.{key} must be a pair [low, high], got {value!r}")
    a, b = cast(value[0]), cast(value[1])
    if key != "size" and not (0 < a <= b):
        raise ConfigError(f"datasets.synthetic.{key} must satisfy 0 < low <= high, got {value!r}")
    return a, b


@register_dataset("synthetic")
class Synthetic(Recipe):
    name = "synthetic"
    archives = ()
    option_keys = frozenset({"count", "size", "seed", "styles", "nuclei", "radius", "touching", "variation"})
    split_policy = SplitPolicy(val="0.1", test="0.2")

    def __init__(self, options: Mapping | None = None):
        super().__init__(options)
        o = self.options
        self.count = o.get("count", 200)
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"datasets.synthetic.count must be a positive integer, got {self.count!r}")
        self.size = _pair(o.get("size", 256), "size", int)
        if min(self.size) < 16:
            raise ConfigError(f"datasets.synthetic.size must be at least 16, got {o.get('size')!r}")
        self.seed = int(o.get("seed", 0))
        self.styles = list(o.get("styles", STYLES))
        bad = [s for s in self.styles if s not in STYLES]
        if bad or not self.styles:
            raise ConfigError(f"datasets.synthetic.styles: unknown {bad or 'empty list'}; known: {', '.join(STYLES)}")
        self.nuclei = _pair(o.get("nuclei", [8, 40]), "nuclei", int)
        self.radius = _pair(o.get("radius", [4, 11]), "radius", float)
        self.touching = float(o.get("touching", 0.35))
        if not 0 <= self.touching <= 1:
            raise ConfigError(f"datasets.synthetic.touching must be in [0, 1], got {self.touching}")
        self.variation = o.get("variation", 1.0)
        if isinstance(self.variation, bool) or not isinstance(self.variation, (int, float)) \
                or not 0 < self.variation <= 10:
            raise ConfigError(f"datasets.synthetic.variation must be a number in (0, 10], got {self.variation!r}")
        self.variation = float(self.variation)
        self._width = max(5, len(str(self.count - 1)))

    def params(self, index: int) -> dict:
        return dict(seed=self.seed, size=self.size, style=self.styles[index % len(self.styles)],
                    nuclei=self.nuclei, radius=self.radius, touching=self.touching, variation=self.variation)

    def sample_id(self, index: int) -> str:
        return f"syn{index:0{self._width}d}"

    def index(self, archives: Mapping[str, Path] | None = None) -> list[SampleRef]:
        return [SampleRef(self.sample_id(i), self.sample_id(i), "train") for i in range(self.count)]

    def verify(self, archives: Mapping[str, Path] | None = None) -> dict:
        return dict(images=self.count, generated=True, **self._description())

    def _description(self) -> dict:
        # variation only where it is not the default: the default's fingerprint predates it
        extra = {} if self.variation == 1.0 else {"variation": self.variation}
        return dict(generator_version=GENERATOR_VERSION, count=self.count, size=list(self.size),
                    seed=self.seed, styles=self.styles, nuclei=list(self.nuclei),
                    radius=list(self.radius), touching=self.touching, **extra)

    def source_fingerprint(self) -> dict[str, str]:
        blob = json.dumps(self._description(), sort_keys=True).encode()
        return {"synthetic-generator": hashlib.sha256(blob).hexdigest()}

    def prepare(self, archives: Mapping[str, Path], writer: PreparedWriter) -> None:
        tasks = [(i, self.params(i)) for i in range(self.count)]
        for i, image, label in parallel_map(_generate_task, tasks, self.workers, desc="synthetic"):
            sid = self.sample_id(i)
            n = int(label.max(initial=0))
            writer.add_image(sid, image.shape[0], image.shape[1], n, "train")
            writer.add_sample(sid, image, label, "train", source_image=sid)
