"""Significance tests for the report: pure functions, frames in, frames out.

Protocol (docs/statistics.md; ../shared/design/statistics.md §4):

- The unit is the **source image**. A case value is the mean of the image's tiles in one seed
  (MoNuSeg: 16 tiles -> one of 14 images; DSB: the image itself), then the mean over the seeds
  whose test set holds the image (:func:`case_values`). Tiles or (seed, image) rows are never
  treated as independent (that inflates the type-I error from 5 % to 32-50 %).
- Two methods are compared on the same (seed, image) keys only; different keys are refused,
  naming what is missing (:func:`pair_cases`).
- Test: two-sided paired Wilcoxon signed-rank on d = a - b rounded to 1e-12,
  ``zero_method="zsplit"``; exact for n <= 50 without ties or zeros, a sign-flip permutation
  (exact enumeration when 2^n <= ``n_resamples``) for n <= 50 with them, asymptotic above.
- Holm within each family declared in the config before results exist (:func:`holm`).
- Effect size: mean d with a 95 % BCa bootstrap CI over source images (after the reduction this
  is a cluster bootstrap) and a t-interval, and the matched-pairs rank-biserial r.
- Seeds only as a robustness check: per-seed mean d and "same sign in k/n seeds".
- All methods at once: Friedman over images x methods, pairwise Wilcoxon + Holm, mean ranks;
  ranking stability by bootstrapping the source images (rank frequencies, Kendall's tau).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as st

from ..errors import DataError

CELL = ["dataset", "ratio"]
CASE_KEYS = ["dataset", "ratio", "method", "seed", "source_id"]
COMPARISON_COLUMNS = ["family", "dataset", "ratio", "metric", "a", "b", "n_cases", "n_seeds",
                      "delta", "ci_low", "ci_high", "t_low", "t_high", "W", "p", "test", "p_holm",
                      "significant", "rbc", "seeds_same_sign", "seed_deltas", "note"]


@dataclass(frozen=True)
class StatOptions:
    alpha: float = 0.05
    n_resamples: int = 9999  # bootstrap and permutation resamples
    n_boot_rank: int = 1000  # bootstrap resamples for the ranking stability
    seed: int = 0  # every random draw starts from this seed: the stats are reproducible
    confidence: float = 0.95


# ---------------------------------------------------------------- reduction

def seed_cases(per_image: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per (dataset, ratio, method, seed, source image): the mean of its tiles."""
    if metric not in per_image.columns:
        raise DataError(f"no per-image column {metric!r} to test")
    frame = per_image.dropna(subset=[metric])
    return (frame.groupby(CASE_KEYS, sort=True)[metric].mean().rename("value").reset_index())


def case_values(seed_level: pd.DataFrame) -> pd.DataFrame:
    """One value per (dataset, ratio, method, source image): the mean over the seeds whose test
    set holds the image; ``n_seeds`` says how many."""
    g = seed_level.groupby(["dataset", "ratio", "method", "source_id"], sort=True)["value"]
    return pd.concat([g.mean().rename("value"), g.size().rename("n_seeds")], axis=1).reset_index()


def _describe_missing(keys: set, limit: int = 3) -> str:
    by_seed: dict = {}
    for seed, image in sorted(keys):
        by_seed.setdefault(seed, []).append(image)
    parts = []
    for seed, images in by_seed.items():
        shown = ", ".join(images[:limit]) + (", ..." if len(images) > limit else "")
        parts.append(f"seed {seed}: {len(images)} image(s) ({shown})")
    return "; ".join(parts)


def pair_cases(seed_level: pd.DataFrame, dataset: str, ratio: int, a: str, b: str) -> pd.DataFrame:
    """Matched per-seed values of methods a and b (columns seed, source_id, a, b). Refuses
    (DataError) when their (seed, image) keys differ, naming the keys one of them lacks."""
    cell = seed_level[(seed_level["dataset"] == dataset) & (seed_level["ratio"] == ratio)]
    sides = {}
    for m in (a, b):
        rows = cell[cell["method"] == m]
        sides[m] = rows.set_index(["seed", "source_id"])["value"]
    ka, kb = set(sides[a].index), set(sides[b].index)
    where = f"{dataset} 1/{ratio}"
    if not ka or not kb:
        absent = [m for m in (a, b) if not sides[m].size]
        raise DataError(f"cannot pair {a} with {b} on {where}: no per-image results for "
                        f"{' and '.join(absent)}")
    if ka != kb:
        parts = []
        if ka - kb:
            parts.append(f"{b} lacks {_describe_missing(ka - kb)}")
        if kb - ka:
            parts.append(f"{a} lacks {_describe_missing(kb - ka)}")
        raise DataError(f"cannot pair {a} with {b} on {where}: their (seed, image) keys differ: "
                        + "; ".join(parts))
    out = pd.DataFrame({a: sides[a], b: sides[b].reindex(sides[a].index)}).reset_index()
    return out.sort_values(["seed", "source_id"], ignore_index=True)


# ---------------------------------------------------------------- one paired test

def signed_rank(d: np.ndarray, options: StatOptions = StatOptions()) -> tuple[float, float, str]:
    """Two-sided Wilcoxon signed-rank test of the paired differences d: (W, p, which test)."""
    d = np.round(np.asarray(d, dtype=float), 12)  # roundoff must not create rank differences
    n = d.size
    if n == 0:
        return np.nan, np.nan, "none (no cases)"
    if np.all(d == 0):
        return np.nan, 1.0, "none (all differences zero)"
    nonzero = np.abs(d[d != 0])
    ties_or_zeros = nonzero.size < n or np.unique(nonzero).size < nonzero.size
    if n <= 50 and not ties_or_zeros:
        method, name = "exact", "Wilcoxon exact"
    elif n <= 50:
        method = st.PermutationMethod(n_resamples=options.n_resamples,
                                      rng=np.random.default_rng(options.seed))
        name = ("Wilcoxon permutation (exact enumeration)" if 2 ** n <= options.n_resamples
                else f"Wilcoxon permutation ({options.n_resamples} resamples)")
    else:
        method, name = "asymptotic", "Wilcoxon normal approximation"
    res = st.wilcoxon(d, zero_method="zsplit", alternative="two-sided", method=method)
    return float(res.statistic), float(min(1.0, res.pvalue)), name


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial r = (R+ - R-) / (R+ + R-) over the ranks of the non-zero |d|
    (Kerby 2014): +1 when a wins on every image, -1 when b does."""
    d = np.round(np.asarray(d, dtype=float), 12)
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = st.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def mean_ci(d: np.ndarray, options: StatOptions = StatOptions()) -> tuple[float, float, float, float]:
    """(BCa bootstrap low, high, t-interval low, high) for the mean of d."""
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return np.nan, np.nan, np.nan, np.nan
    mean = d.mean()
    half = st.t.ppf(0.5 + options.confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    if np.ptp(d) == 0:  # every resample has the same mean
        return mean, mean, mean, mean
    res = st.bootstrap((d,), np.mean, confidence_level=options.confidence, method="BCa",
                       n_resamples=options.n_resamples, rng=np.random.default_rng(options.seed))
    low, high = res.confidence_interval
    return float(low), float(high), float(mean - half), float(mean + half)


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def compare(seed_level: pd.DataFrame, dataset: str, ratio: int, a: str, b: str,
            options: StatOptions = StatOptions()) -> dict:
    """One comparison a - b on source images (raises DataError on mismatched keys)."""
    pairs = pair_cases(seed_level, dataset, ratio, a, b)
    per_image = pairs.groupby("source_id")[[a, b]].mean()  # average over seeds first
    d = np.round(per_image[a].to_numpy() - per_image[b].to_numpy(), 12)
    w, p, test = signed_rank(d, options)
    ci = mean_ci(d, options)
    pairs["d"] = pairs[a] - pairs[b]
    seed_d = pairs.groupby("seed")["d"].mean()
    delta = float(d.mean())
    same = int((np.sign(np.round(seed_d.to_numpy(), 12)) == np.sign(delta)).sum()) if delta else 0
    return {"dataset": dataset, "ratio": int(ratio), "a": a, "b": b, "n_cases": int(d.size),
            "n_seeds": int(seed_d.size), "delta": delta, "ci_low": ci[0], "ci_high": ci[1],
            "t_low": ci[2], "t_high": ci[3], "W": w, "p": p, "test": test,
            "rbc": rank_biserial(d), "seeds_same_sign": f"{same}/{seed_d.size}",
            "seed_deltas": " ".join(f"s{s}:{v:+.4f}" for s, v in seed_d.items()), "note": ""}


# ---------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    """Comparisons corrected together: every method of ``methods`` vs ``against`` at every
    (dataset, ratio) of ``cells``; Holm runs over the whole family per dataset."""
    name: str
    against: str
    methods: tuple
    cells: tuple  # (dataset, ratio) pairs


def run_families(seed_level: pd.DataFrame, families: list[Family], metric: str,
                 options: StatOptions = StatOptions(), strict: bool = False) -> pd.DataFrame:
    """Every declared comparison as a row of ``COMPARISON_COLUMNS``. A comparison that cannot
    be paired (a missing run, mismatched keys) raises when ``strict``; otherwise it stays in the
    table untested with the reason in ``note`` (and does not count in Holm)."""
    rows = []
    for fam in families:
        for dataset, ratio in fam.cells:
            for m in fam.methods:
                if m == fam.against:
                    continue
                try:
                    row = compare(seed_level, dataset, ratio, m, fam.against, options)
                except DataError as e:
                    if strict:
                        raise
                    row = {"dataset": dataset, "ratio": int(ratio), "a": m, "b": fam.against,
                           "n_cases": 0, "p": np.nan, "note": f"not tested: {e}"}
                rows.append(dict(row, family=fam.name, metric=metric))
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    frame["p_holm"] = np.nan
    for _, idx in frame.groupby(["family", "dataset"], sort=False).groups.items():
        frame.loc[idx, "p_holm"] = holm(frame.loc[idx, "p"].to_numpy())
    frame["significant"] = frame["p_holm"] < options.alpha
    return frame


# ---------------------------------------------------------------- all methods at once

def case_matrix(cases: pd.DataFrame, dataset: str, ratio: int, methods: list[str]) -> pd.DataFrame:
    """Source images x methods (seed-averaged values), only images every method has."""
    cell = cases[(cases["dataset"] == dataset) & (cases["ratio"] == ratio)
                 & cases["method"].isin(methods)]
    wide = cell.pivot(index="source_id", columns="method", values="value")
    return wide[[m for m in methods if m in wide.columns]].dropna()


def _ranks(x: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per-row ranks, 1 = best, ties averaged."""
    return st.rankdata(-x if higher_is_better else x, axis=-1)


def friedman(cases: pd.DataFrame, seed_level: pd.DataFrame, cells: list[tuple], methods: list[str],
             higher_is_better: bool = True, options: StatOptions = StatOptions()
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (dataset, ratio): Friedman chi², p, Kendall's W, mean ranks; and the pairwise
    Wilcoxon + Holm matrix (long: a, b, p, p_holm) over the k(k-1)/2 pairs."""
    omnibus, pairwise = [], []
    for dataset, ratio in cells:
        x = case_matrix(cases, dataset, ratio, methods)
        k, n = x.shape[1], x.shape[0]
        row = {"dataset": dataset, "ratio": int(ratio), "n_cases": n, "k": k,
               "methods": " ".join(x.columns)}
        if k >= 3 and n >= 2:
            chi2, p = st.friedmanchisquare(*x.to_numpy().T)
            row.update(chi2=float(chi2), p=float(p), kendall_w=float(chi2 / (n * (k - 1))))
        else:
            row.update(chi2=np.nan, p=np.nan, kendall_w=np.nan,
                       note="needs at least 3 methods and 2 images")
        ranks = _ranks(x.to_numpy(), higher_is_better).mean(axis=0) if n else np.full(k, np.nan)
        row.update({f"rank_{m}": r for m, r in zip(x.columns, ranks)})
        omnibus.append(row)
        pairs = []
        for i, a in enumerate(x.columns):
            for b in x.columns[i + 1:]:
                try:
                    c = compare(seed_level, dataset, ratio, a, b, options)
                    pairs.append({"dataset": dataset, "ratio": int(ratio), "a": a, "b": b,
                                  "n_cases": c["n_cases"], "delta": c["delta"], "p": c["p"]})
                except DataError as e:
                    pairs.append({"dataset": dataset, "ratio": int(ratio), "a": a, "b": b,
                                  "n_cases": 0, "delta": np.nan, "p": np.nan, "note": str(e)})
        adj = holm([q["p"] for q in pairs])
        for q, pa in zip(pairs, adj):
            q["p_holm"] = pa
        pairwise += pairs
    return pd.DataFrame(omnibus), pd.DataFrame(pairwise)


def ranking_stability(cases: pd.DataFrame, cells: list[tuple], methods: list[str],
                      higher_is_better: bool = True, options: StatOptions = StatOptions()
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """challengeR-style bootstrap of the source images (aggregate-then-rank). Returns the rank
    frequencies (dataset, ratio, method, rank, freq) and a summary per method (full-data rank,
    median rank, 2.5/97.5 % ranks, winner frequency) with the mean Kendall tau between the
    bootstrap rankings and the full-data ranking."""
    freq_rows, summary_rows = [], []
    for dataset, ratio in cells:
        x = case_matrix(cases, dataset, ratio, methods)
        if x.shape[0] < 2 or x.shape[1] < 2:
            continue
        values = x.to_numpy()
        rng = np.random.default_rng(options.seed)
        idx = rng.integers(0, values.shape[0], size=(options.n_boot_rank, values.shape[0]))
        boot_means = values[idx].mean(axis=1)  # B x k
        boot_ranks = st.rankdata(-boot_means if higher_is_better else boot_means, axis=1,
                                 method="min")
        full = st.rankdata(-values.mean(0) if higher_is_better else values.mean(0), method="min")
        taus = [st.kendalltau(full, r).statistic for r in boot_ranks]
        tau = float(np.nanmean(taus)) if np.isfinite(taus).any() else np.nan
        k = values.shape[1]
        for j, m in enumerate(x.columns):
            r = boot_ranks[:, j]
            for rank in range(1, k + 1):
                freq_rows.append({"dataset": dataset, "ratio": int(ratio), "method": m,
                                  "rank": rank, "freq": float(np.mean(r == rank))})
            summary_rows.append({"dataset": dataset, "ratio": int(ratio), "method": m,
                                 "n_cases": values.shape[0], "rank_full": int(full[j]),
                                 "rank_median": float(np.median(r)),
                                 "rank_low": float(np.percentile(r, 2.5)),
                                 "rank_high": float(np.percentile(r, 97.5)),
                                 "winner_freq": float(np.mean(r == 1)), "kendall_tau": tau,
                                 "n_boot": options.n_boot_rank})
    return pd.DataFrame(freq_rows), pd.DataFrame(summary_rows)
