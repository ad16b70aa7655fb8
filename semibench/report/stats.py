"""Significance tests for the report: pure functions, frames in, frames out.

Protocol (docs/statistics.md):

- The unit is the **source image**. A case value is the mean of the image's tiles in one seed
  (MoNuSeg: 16 tiles -> one of 14 images; DSB: the image itself), then the mean over the seeds
  whose test set holds the image (:func:`case_values`). Tiles or (seed, image) rows are never
  treated as independent (that inflates the type-I error from 5 % to 32-50 %).
- Two methods are compared on the same (seed, image) keys only; different keys are refused,
  naming what is missing (:func:`pair_cases`).
- Test: two-sided paired Wilcoxon signed-rank on d = a - b rounded to 1e-12, a zero difference
  counting half to each side (scipy's ``zero_method="zsplit"``); exact for n <= 50 without ties or
  zeros; with them, every one of the 2^n sign flips enumerated for n <= :data:`EXACT_MAX_N`
  (``scipy.stats.permutation_test``), ``n_resamples`` random sign flips for n <= 50, the normal
  approximation above.
- NaN: a sample (tile) whose metric is NaN makes its image's value in that seed NaN; that
  (seed, image) pair is left out of every comparison that would use it, named in the note.
- Holm within each family declared in the config before results exist (:func:`holm`).
- Effect size: mean d with a 95 % BCa bootstrap CI over source images (after the reduction this
  is a cluster bootstrap) and a t-interval, and the matched-pairs rank-biserial r.
- Seeds only as a robustness check: per-seed mean d and "same sign in k/n seeds".
- All methods at once: Friedman over images x methods, pairwise Wilcoxon + Holm, mean ranks;
  ranking stability by bootstrapping the source images (rank frequencies, Kendall's tau). All on
  the (seed, image) pairs that every compared method has with a value (:func:`paired_subset`),
  the rest named in the note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as st

from semibench.errors import DataError

CELL = ["dataset", "ratio"]
CASE_KEYS = ["dataset", "ratio", "method", "seed", "source_id"]
COMPARISON_COLUMNS = ["family", "dataset", "ratio", "metric", "a", "b", "n_cases", "n_seeds",
                      "delta", "ci_low", "ci_high", "t_low", "t_high", "W", "p", "test",
                      "resamples", "p_holm", "significant", "rbc", "seeds_same_sign",
                      "seed_deltas", "note"]
EXACT_MAX_N = 20  # 2^20 sign flips enumerated in seconds; random resampling only above


@dataclass(frozen=True)
class StatOptions:
    alpha: float = 0.05
    n_resamples: int = 9999  # bootstrap and permutation resamples
    n_boot_rank: int = 1000  # bootstrap resamples for the ranking stability
    seed: int = 0  # every random draw starts from this seed: the stats are reproducible
    confidence: float = 0.95


# ---------------------------------------------------------------- reduction

def seed_cases(per_image: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per (dataset, ratio, method, seed, source image): the mean of its tiles. An image
    with a NaN tile is NaN (a mean over the other tiles would not be paired with the other
    methods' images); ``nan_ids`` names the NaN samples."""
    if metric not in per_image.columns:
        raise DataError(f"no per-image column {metric!r} to test")
    frame = per_image.assign(_nan=per_image[metric].isna())
    g = frame.groupby(CASE_KEYS, sort=True)
    value = g[metric].mean().where(~g["_nan"].any())
    nan_ids = frame[frame["_nan"]].groupby(CASE_KEYS, sort=True)["id"].agg(" ".join)
    out = pd.DataFrame({"value": value, "nan_ids": nan_ids.reindex(value.index).fillna("")})
    out = out.reset_index()
    out.attrs["metric"] = metric  # named in the notes
    return out


def nan_note(rows: pd.DataFrame, metric: str = "metric", limit: int = 3) -> str:
    """'NaN dice: cdcl seed 1 img3 (sample img3_t2), ...' for seed-level rows with NaN values."""
    rows = rows[rows["value"].isna()]
    if rows.empty:
        return ""
    parts = []
    for r in rows.head(limit).itertuples():
        ids = getattr(r, "nan_ids", "") or ""
        sample = f" (sample {ids})" if ids and ids != r.source_id else ""
        parts.append(f"{r.method} seed {r.seed} {r.source_id}{sample}")
    more = f", and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"NaN {metric}: " + ", ".join(parts) + more


def case_values(seed_level: pd.DataFrame) -> pd.DataFrame:
    """One value per (dataset, ratio, method, source image): the mean over the seeds whose test
    set holds the image with a value (NaN left out); ``n_seeds`` says how many."""
    finite = seed_level.dropna(subset=["value"])
    g = finite.groupby(["dataset", "ratio", "method", "source_id"], sort=True)["value"]
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
    """Matched per-seed values of methods a and b (columns seed, source_id, a, b; NaN values
    kept). Refuses (DataError) when their (seed, image) keys differ, naming the keys one of them
    lacks."""
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

class RankTest(NamedTuple):
    W: float  # min(R+, R-), a zero difference's rank split between both
    p: float
    test: str  # which null distribution, in words
    resamples: int | None  # sign flips evaluated (2^n when enumerated); None: not resampled


def sign_flip_p(d: np.ndarray, n_resamples: int, seed: int) -> float:
    """Two-sided p of R+ (zeros split) under random signs: ``scipy.stats.permutation_test`` flips
    the signs of d; with ``n_resamples >= 2^n`` it enumerates every flip (exact, seed unused).
    The ranks do not change under a flip, so R+ is one weighted sum per flip."""
    ranks = st.rankdata(np.abs(d))
    zero_half = ranks[d == 0].sum() / 2

    def r_plus(x, axis=-1):
        return np.sum(np.where(x > 0, ranks, 0.0), axis=axis) + zero_half

    res = st.permutation_test((d,), r_plus, permutation_type="samples", vectorized=True,
                              n_resamples=n_resamples, alternative="two-sided", batch=1 << 16,
                              rng=np.random.default_rng(seed))
    return float(res.pvalue)


def signed_rank(d: np.ndarray, options: StatOptions = StatOptions()) -> RankTest:
    """Two-sided Wilcoxon signed-rank test of the paired differences d."""
    d = np.round(np.asarray(d, dtype=float), 12)  # roundoff must not create rank differences
    n = d.size
    if n == 0:
        return RankTest(np.nan, np.nan, "none (no cases)", None)
    if np.all(d == 0):
        return RankTest(np.nan, 1.0, "none (all differences zero)", None)
    nonzero = np.abs(d[d != 0])
    ties_or_zeros = nonzero.size < n or np.unique(nonzero).size < nonzero.size
    w = float(st.wilcoxon(d, zero_method="zsplit", method="asymptotic").statistic)
    if ties_or_zeros and n <= EXACT_MAX_N:
        p = sign_flip_p(d, 2 ** n, options.seed)
        return RankTest(w, min(1.0, p), f"Wilcoxon exact (all {2 ** n} sign flips)", 2 ** n)
    if ties_or_zeros and n <= 50:
        p = sign_flip_p(d, options.n_resamples, options.seed)
        return RankTest(w, min(1.0, p), f"Wilcoxon sign-flip resampling ({options.n_resamples} "
                        f"random flips, seed {options.seed})", options.n_resamples)
    method = "exact" if n <= 50 else "asymptotic"
    res = st.wilcoxon(d, zero_method="zsplit", alternative="two-sided", method=method)
    name = "Wilcoxon exact" if n <= 50 else "Wilcoxon normal approximation"
    return RankTest(float(res.statistic), float(min(1.0, res.pvalue)), name, None)


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


def sign_disagreement(delta: float, rbc: float) -> str:
    """Why a mean difference and the rank-biserial r can point different ways, when they do."""
    if not (delta and rbc) or np.sign(delta) == np.sign(rbc):
        return ""
    better, worse = ("a few", "most") if delta > 0 else ("most", "a few")
    return (f"Δ and r disagree in sign: the method gains on {better} images and loses on "
            f"{worse}; Δ weighs each image by its difference, r by the difference's rank, so a "
            f"few large differences carry Δ while the many smaller ones carry r (and the test)")


def compare(seed_level: pd.DataFrame, dataset: str, ratio: int, a: str, b: str,
            options: StatOptions = StatOptions()) -> dict:
    """One comparison a - b on source images (raises DataError on mismatched keys). A (seed,
    image) pair with a NaN on either side is left out, and the note says which."""
    pairs = pair_cases(seed_level, dataset, ratio, a, b)
    notes = []
    bad = pairs[a].isna() | pairs[b].isna()
    if bad.any():
        cell = seed_level[(seed_level["dataset"] == dataset) & (seed_level["ratio"] == ratio)
                          & seed_level["method"].isin([a, b])]
        keys = set(zip(pairs.loc[bad, "seed"], pairs.loc[bad, "source_id"]))
        rows = cell[[k in keys for k in zip(cell["seed"], cell["source_id"])]]
        notes.append(f"{int(bad.sum())} (seed, image) pair(s) left out, "
                     + nan_note(rows, _metric_name(seed_level)))
        pairs = pairs[~bad]
    if pairs.empty:  # a NaN is data, not a broken grid: reported, never an error
        return {"dataset": dataset, "ratio": int(ratio), "a": a, "b": b, "n_cases": 0,
                "p": np.nan, "note": "not tested: no (seed, image) pair with a value on both "
                                     "sides; " + "; ".join(notes)}
    per_image = pairs.groupby("source_id")[[a, b]].mean()  # average over seeds first
    d = np.round(per_image[a].to_numpy() - per_image[b].to_numpy(), 12)
    test = signed_rank(d, options)
    ci = mean_ci(d, options)
    pairs = pairs.assign(d=pairs[a] - pairs[b])
    seed_d = pairs.groupby("seed")["d"].mean()
    delta = float(d.mean())
    rbc = rank_biserial(d)
    same = int((np.sign(np.round(seed_d.to_numpy(), 12)) == np.sign(delta)).sum()) if delta else 0
    notes.append(sign_disagreement(delta, rbc))
    return {"dataset": dataset, "ratio": int(ratio), "a": a, "b": b, "n_cases": int(d.size),
            "n_seeds": int(seed_d.size), "delta": delta, "ci_low": ci[0], "ci_high": ci[1],
            "t_low": ci[2], "t_high": ci[3], "W": test.W, "p": test.p, "test": test.test,
            "resamples": test.resamples, "rbc": rbc, "seeds_same_sign": f"{same}/{seed_d.size}",
            "seed_deltas": " ".join(f"s{s}:{v:+.6f}" for s, v in seed_d.items()),
            "note": "; ".join(n for n in notes if n)}


def _metric_name(seed_level: pd.DataFrame) -> str:
    return seed_level.attrs.get("metric", "metric")


# ---------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    """Comparisons corrected together: every method of ``methods`` vs ``against`` at every
    (dataset, ratio) of ``cells``; Holm runs over the whole family per dataset."""
    name: str
    against: str
    methods: tuple
    cells: tuple  # (dataset, ratio) pairs
    left_out: tuple = ()  # ((dataset, ratio, method), why): not trained as the config stands


def run_families(seed_level: pd.DataFrame, families: list[Family], metric: str,
                 options: StatOptions = StatOptions(), strict: bool = False) -> pd.DataFrame:
    """Every declared comparison as a row of ``COMPARISON_COLUMNS``. A comparison that cannot
    be paired (a missing run, mismatched keys) raises when ``strict``; otherwise it stays in the
    table untested with the reason in ``note`` (and does not count in Holm). A comparison the
    family leaves out (the config does not train one side) stays untested with its reason."""
    rows = []
    for fam in families:
        skip = dict(fam.left_out)
        for dataset, ratio in fam.cells:
            for m in fam.methods:
                if m == fam.against:
                    continue
                if (dataset, ratio, m) in skip:
                    rows.append({"dataset": dataset, "ratio": int(ratio), "a": m,
                                 "b": fam.against, "n_cases": 0, "p": np.nan, "family": fam.name,
                                 "metric": metric,
                                 "note": f"left out: {skip[(dataset, ratio, m)]}"})
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

def paired_subset(seed_level: pd.DataFrame, dataset: str, ratio: int, methods: list[str]
                  ) -> tuple[pd.DataFrame, list[str], str]:
    """What all-methods-at-once statistics compare, paired as the two-method tests are: the
    seed-level rows of ``methods`` at one cell on the (seed, image) pairs that every method has
    with a value. Returns (those rows, the methods kept, a note naming what was left out and
    why). A method with no result at the cell is left out (not every image with it)."""
    cell = seed_level[(seed_level["dataset"] == dataset) & (seed_level["ratio"] == ratio)
                      & seed_level["method"].isin(methods)]
    present = [m for m in methods if (cell["method"] == m).any()]
    notes = []
    absent = [m for m in methods if m not in present]
    if absent:
        notes.append(f"{', '.join(absent)} left out (no per-image results)")
    keys = {m: set(zip(rows["seed"], rows["source_id"])) for m, rows in cell.groupby("method")}
    every = set().union(*keys.values()) if keys else set()
    common = set.intersection(*(keys[m] for m in present)) if present else set()
    for m in present:
        if every - keys[m]:
            notes.append(f"{m} lacks {_describe_missing(every - keys[m])}")
    nan_rows = cell[cell["value"].isna()]
    if not nan_rows.empty:
        notes.append(nan_note(nan_rows, _metric_name(seed_level)))
        common -= set(zip(nan_rows["seed"], nan_rows["source_id"]))
    rows = cell[[k in common for k in zip(cell["seed"], cell["source_id"])]]
    note = ""
    if len(common) < len(every) or absent:
        note = (f"on the {len(common)} of {len(every)} (seed, image) pairs that every method has "
                f"with a value: " + "; ".join(notes))
    return rows, present, note


def case_matrix(rows: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Source images x methods of paired seed-level rows, each the mean over its seeds."""
    if rows.empty:
        return pd.DataFrame(columns=methods, dtype=float)
    wide = rows.groupby(["source_id", "method"])["value"].mean().unstack("method")
    return wide[[m for m in methods if m in wide.columns]]


def _ranks(x: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per-row ranks, 1 = best, ties averaged."""
    return st.rankdata(-x if higher_is_better else x, axis=-1)


def friedman(seed_level: pd.DataFrame, cells: list[tuple], methods: list[str],
             higher_is_better: bool = True, options: StatOptions = StatOptions()
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (dataset, ratio): Friedman chi², p, Kendall's W, mean ranks; and the pairwise
    Wilcoxon + Holm matrix (long: a, b, p, p_holm) over the k(k-1)/2 pairs; all on the
    :func:`paired_subset`, whose note is in ``note``."""
    omnibus, pairwise = [], []
    for dataset, ratio in cells:
        rows, kept, note = paired_subset(seed_level, dataset, ratio, methods)
        x = case_matrix(rows, kept)
        k, n = x.shape[1], x.shape[0]
        row = {"dataset": dataset, "ratio": int(ratio), "n_cases": n, "k": k,
               "methods": " ".join(x.columns), "note": note}
        if k >= 3 and n >= 2:
            chi2, p = st.friedmanchisquare(*x.to_numpy().T)
            row.update(chi2=float(chi2), p=float(p), kendall_w=float(chi2 / (n * (k - 1))))
        else:
            row.update(chi2=np.nan, p=np.nan, kendall_w=np.nan,
                       note="; ".join(t for t in (note, "Friedman needs at least 3 methods and "
                                                        "2 images") if t))
        ranks = _ranks(x.to_numpy(), higher_is_better).mean(axis=0) if n else np.full(k, np.nan)
        row.update({f"rank_{m}": r for m, r in zip(x.columns, ranks)})
        omnibus.append(row)
        pairs = []
        for i, a in enumerate(x.columns):
            for b in x.columns[i + 1:]:
                try:
                    c = compare(rows, dataset, ratio, a, b, options)
                    pairs.append({"dataset": dataset, "ratio": int(ratio), "a": a, "b": b,
                                  "n_cases": c["n_cases"], "delta": c["delta"], "p": c["p"],
                                  "note": c["note"]})
                except DataError as e:
                    pairs.append({"dataset": dataset, "ratio": int(ratio), "a": a, "b": b,
                                  "n_cases": 0, "delta": np.nan, "p": np.nan, "note": str(e)})
        adj = holm([q["p"] for q in pairs])
        for q, pa in zip(pairs, adj):
            q["p_holm"] = pa
        pairwise += pairs
    return pd.DataFrame(omnibus), pd.DataFrame(pairwise)


def ranking_stability(seed_level: pd.DataFrame, cells: list[tuple], methods: list[str],
                      higher_is_better: bool = True, options: StatOptions = StatOptions()
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """challengeR-style bootstrap of the source images (aggregate-then-rank) on the
    :func:`paired_subset`. Returns the rank frequencies (dataset, ratio, method, rank, freq) and
    a summary per method (full-data rank, median rank, 2.5/97.5 % ranks, winner frequency) with
    the mean Kendall tau between the bootstrap rankings and the full-data ranking."""
    freq_rows, summary_rows = [], []
    for dataset, ratio in cells:
        rows, kept, _ = paired_subset(seed_level, dataset, ratio, methods)
        x = case_matrix(rows, kept)
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
