"""Claims over training runs: a two-level bootstrap of a comparison's Δ (seeds, then source
images within each drawn seed), the number of seeds a difference of the observed size needs,
and the words that say whether a difference holds over test images, over runs, or both.

The image-level tests (semibench.report.stats) generalise over test images of these trained
runs; a seed that disagrees is one value among the images there. Here a seed is the unit first:
with 2-3 seeds the two-level interval reaches every seed's own Δ, so a claim "over training
runs" needs every seed to show it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

from ..errors import DataError
from .stats import StatOptions, pair_cases

TWO_LEVEL_REPS = 2000  # two-level resamples per comparison (numpy, milliseconds)
STUDIES = 2000  # simulated studies per seed count in seeds_needed
POOL = 2000  # image-level resample means kept per observed seed for the simulation
MAX_SEEDS = 50  # seeds_needed searches 2..MAX_SEEDS and says "> 50" beyond
POWER = 0.8
MINUS = "\u2212"
DEFAULTS = StatOptions()


def seed_differences(seed_level: pd.DataFrame, dataset: str, ratio: int, a: str, b: str
                     ) -> list[np.ndarray]:
    """Per seed (ascending), the differences a - b of its source images with a value on both
    sides: the unit the image-level test uses, kept apart by seed."""
    pairs = pair_cases(seed_level, dataset, ratio, a, b).dropna(subset=[a, b])
    return [np.round(g[a].to_numpy() - g[b].to_numpy(), 12)
            for _, g in pairs.groupby("seed", sort=True)]


def two_level_means(diffs: list[np.ndarray], reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` two-level resamples of the mean difference: draw as many seeds as there are,
    with replacement, then each drawn seed's images with replacement; the statistic is the mean
    over the drawn seeds of their resampled image means (each seed weighs the same)."""
    n = len(diffs)
    drawn = rng.integers(0, n, size=(reps, n))
    slots = np.empty((reps, n))
    for s, d in enumerate(diffs):
        where = drawn == s
        k = int(where.sum())
        if k:  # every slot that drew seed s gets its own resample of s's images
            slots[where] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    return slots.mean(axis=1)


def two_level_ci(diffs: list[np.ndarray], options: StatOptions = DEFAULTS,
                 reps: int = TWO_LEVEL_REPS) -> tuple[float, float]:
    """Percentile interval of :func:`two_level_means`; NaN with fewer than two seeds (one seed
    says nothing about the spread between runs)."""
    if len(diffs) < 2 or any(d.size == 0 for d in diffs):
        return np.nan, np.nan
    means = two_level_means(diffs, reps, np.random.default_rng(options.seed))
    tail = (1 - options.confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def seeds_needed(diffs: list[np.ndarray], options: StatOptions = DEFAULTS,
                 power: float = POWER, max_seeds: int = MAX_SEEDS, studies: int = STUDIES
                 ) -> int | None:
    """The fewest seeds (2..max_seeds) at which a study like this one has its two-level CI on
    the observed side of 0 with probability ``power``; None beyond ``max_seeds`` (or no
    difference). A simulated study of n seeds is n two-level bootstrap draws of the observed
    seeds (a seed, then its images); its CI is taken as mean ± z·SE with SE² = (variance of its
    seed means + their mean image-level variance) / n, the normal form of the two-level
    percentile interval (exact resampling at every n would take seconds per comparison)."""
    if len(diffs) < 2:
        return None
    direction = np.sign(np.mean([d.mean() for d in diffs]))
    if direction == 0:
        return None
    rng = np.random.default_rng(options.seed)
    pools = np.stack([d[rng.integers(0, d.size, size=(POOL, d.size))].mean(axis=1) for d in diffs])
    within = pools.var(axis=1)
    z = st.norm.ppf(0.5 + options.confidence / 2)
    for n in range(2, max_seeds + 1):
        seeds = rng.integers(0, len(diffs), size=(studies, n))
        means = pools[seeds, rng.integers(0, POOL, size=(studies, n))]
        se = np.sqrt((means.var(axis=1) + within[seeds].mean(axis=1)) / n)
        if np.mean(direction * means.mean(axis=1) - z * se > 0) >= power:
            return n
    return None


def points(values) -> str:
    """[0.07, 0.0084, -0.0002] -> '+7.00, +0.84, −0.02' (fractions to points, a true minus)."""
    return ", ".join(f"{v * 100:+.2f}".replace("-", MINUS) for v in values)


def claim(significant: bool, low: float, high: float, seed_deltas) -> tuple[str, str]:
    """(holds_over, words): which kind of claim a comparison supports. ``significant``: the
    image-level test after Holm; (low, high): the two-level CI; ``seed_deltas``: per seed Δ."""
    images = ("significant" if significant else "not significant") + " over test images"
    n = len(seed_deltas)
    if n < 2 or not np.isfinite(low):
        return ("images" if significant else "neither",
                f"{images}; not assessable over training runs (one seed: no spread)")
    runs = low > 0 or high < 0
    spread = f"({n} seeds: {points(seed_deltas)})"
    words = f"{images}; {'established' if runs else 'not established'} over training runs {spread}"
    holds = {(True, True): "both", (True, False): "images", (False, True): "runs",
             (False, False): "neither"}[(bool(significant), bool(runs))]
    return holds, words


def annotate(comparisons: pd.DataFrame, seed_level: pd.DataFrame,
             options: StatOptions = DEFAULTS) -> pd.DataFrame:
    """The comparisons with two_level_low/high, seeds_needed ('4', '> 50'; '' with one seed),
    holds_over and claim; untested rows stay empty."""
    out = comparisons.copy()
    extra = {c: [] for c in ("two_level_low", "two_level_high", "seeds_needed", "holds_over",
                             "claim")}
    for r in comparisons.itertuples():
        values = (np.nan, np.nan, "", "", "")
        if pd.notna(r.p):
            try:
                diffs = seed_differences(seed_level, r.dataset, r.ratio, r.a, r.b)
            except DataError:  # already untested with the reason in its note
                diffs = []
            if diffs:
                low, high = two_level_ci(diffs, options)
                need = seeds_needed(diffs, options)
                needed = "" if len(diffs) < 2 else (f"> {MAX_SEEDS}" if need is None else str(need))
                holds, words = claim(bool(r.significant), low, high, [d.mean() for d in diffs])
                values = (low, high, needed, holds, words)
        for c, v in zip(extra, values):
            extra[c].append(v)
    for c, v in extra.items():
        out[c] = v
    return out


def claims_note(comparisons: pd.DataFrame | None, families, display) -> str:
    """Table footnote sentence: the comparisons of ``families`` that hold over test images or
    over runs, grouped by which of the two (the marks are claims over test images only)."""
    if comparisons is None or comparisons.empty or "holds_over" not in comparisons:
        return ""
    rows = comparisons[comparisons["family"].isin(families)
                       & comparisons["holds_over"].isin(["both", "images", "runs"])]
    groups: dict = {}
    for r in rows.itertuples():
        head, _, seeds = r.claim.partition(" over training runs (")
        where = f"{display(r.a)} vs {display(r.b)} ({r.dataset} 1/{int(r.ratio)}"
        if seeds.startswith("one seed"):  # the same for every row: say it once in the head
            groups.setdefault(r.claim, []).append(where + ")")
        else:
            groups.setdefault(head + " over training runs", []).append(f"{where}; {seeds}")
    if not groups:
        return ""
    parts = [f"{head[0].upper()}{head[1:]}: {', '.join(items)}" for head, items in groups.items()]
    return (" Over test images and over training runs (a mark is a claim over test images; over "
            "runs = the two-level bootstrap 95 % CI of the difference, seeds then images, "
            "excludes 0). " + ". ".join(parts) + ".")
