"""Over training runs, with rliable (Agarwal et al., NeurIPS 2021): per method the mean and the
interquartile mean (IQM) of per-run Dice with stratified bootstrap 95 % CIs (runs = seeds,
tasks = dataset x ratio cells), and the probability of improvement P(method > baseline) and
P(method > reference) with CIs; per cell and over all cells of Table 1.

A run's value is the one Table 1 averages (``report.convention`` of ``report.metric`` in its
metrics.json). rliable's probability of improvement compares every run of X with every run of Y
(Mann-Whitney U / (n_x n_y): a tie counts 1/2), unpaired: the seeds' shared splits are not used.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pandas as pd

from .plan import UPPER_BOUND, ReportPlan, order_methods
from .read import Results
from .seeding import seeded

AGG_REPS = 2000  # stratified bootstrap resamples of the mean and IQM
POI_REPS = 500  # of the probability of improvement (one Mann-Whitney U per task and resample)
COLUMNS = ["scope", "dataset", "ratio", "method", "statistic", "vs", "value", "ci_low",
           "ci_high", "n_runs", "n_tasks", "reps", "note"]


def rliable():
    """(library, metrics) of rliable. Its stratified bootstrap needs only ``arch.bootstrap``, but
    arch < 8 (all that rliable 1.2 admits) fails at its top-level import under pandas 3 (its
    GARCH models call a pandas decorator with an old signature): then arch's package is entered
    without running its ``__init__``, which only re-exports those models."""
    try:
        import arch  # noqa: F401
    except TypeError:
        for name in [n for n in sys.modules if n == "arch" or n.startswith("arch.")]:
            del sys.modules[name]
        package = types.ModuleType("arch")
        package.__path__ = list(importlib.util.find_spec("arch").submodule_search_locations)
        sys.modules["arch"] = package
    from rliable import library, metrics
    return library, metrics




def _memo(func):
    """``func`` once per distinct resample: the statistics here depend only on the multiset of
    runs in each task (column), and with 2-3 runs most resamples repeat one (3 runs: 10
    multisets per task)."""
    cache = {}

    def once(*arrays):
        key = tuple(np.sort(a, axis=0).tobytes() for a in arrays)
        if key not in cache:
            cache[key] = func(*arrays)
        return cache[key]
    return once


def run_scores(results: Results, plan: ReportPlan) -> pd.DataFrame:
    """dataset, ratio, method, seed, value: one finite value per run (FullSup, trained at
    another ratio, left out)."""
    runs = results.runs
    runs = runs[(runs["convention"] == plan.convention) & (runs["metric"] == plan.metric)
                & (runs["method"] != UPPER_BOUND)]
    return runs[["dataset", "ratio", "method", "seed", "value"]].sort_values(
        ["dataset", "ratio", "method", "seed"], ignore_index=True)


def score_matrix(scores: pd.DataFrame, method: str, cells: list[tuple]) -> tuple[np.ndarray, str]:
    """Runs x tasks of ``method`` over the ``cells`` where it has runs, on the seeds every one
    of those cells has (a stratified bootstrap needs as many runs per task); the note names the
    seeds left out."""
    rows = scores[scores["method"] == method]
    by_cell = {c: rows[(rows["dataset"] == c[0]) & (rows["ratio"] == c[1])].set_index("seed")["value"]
               for c in cells}
    by_cell = {c: v for c, v in by_cell.items() if not v.empty}
    if not by_cell:
        return np.empty((0, 0)), ""
    common = sorted(set.intersection(*(set(v.index) for v in by_cell.values())))
    dropped = [f"{d} 1/{k} seed {s}" for (d, k), v in by_cell.items() for s in v.index
               if s not in common]
    note = f"left out (not in every cell): {', '.join(dropped)}" if dropped else ""
    return np.column_stack([v.loc[common].to_numpy(float) for v in by_cell.values()]), note


def aggregates(matrix: np.ndarray, seed: int, reps: int = AGG_REPS, confidence: float = 0.95):
    """{"mean": (value, low, high), "iqm": (...)} of a runs x tasks matrix, rliable's
    aggregate_mean and aggregate_iqm with its stratified bootstrap percentile CIs."""
    library, metrics = rliable()

    def both(x):
        return np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])

    with seeded(seed):
        point, ci = library.get_interval_estimates({"m": matrix}, _memo(both), reps=reps,
                                                   confidence_interval_size=confidence)
    return {name: (float(point["m"][i]), float(ci["m"][0, i]), float(ci["m"][1, i]))
            for i, name in enumerate(("mean", "iqm"))}


def p_improvement(x: np.ndarray, y: np.ndarray, seed: int, reps: int = POI_REPS,
                  confidence: float = 0.95) -> tuple[float, float, float]:
    """rliable's P(X > Y) (runs x tasks each, the same tasks) with the stratified bootstrap
    CI that resamples X's and Y's runs independently."""
    library, metrics = rliable()
    per_task = _memo(metrics.probability_of_improvement)

    def poi(a, b):  # rliable's P is the mean of its per-task P: one task at a time, each once
        return np.array([np.mean([per_task(a[:, [j]], b[:, [j]]) for j in range(a.shape[1])])])

    with seeded(seed):
        point, ci = library.get_interval_estimates({"p": [x, y]}, poi, reps=reps,
                                                   confidence_interval_size=confidence)
    return float(point["p"][0]), float(ci["p"][0, 0]), float(ci["p"][1, 0])


def _pair(scores: pd.DataFrame, a: str, b: str, cells: list[tuple]) -> tuple:
    """The matrices of a and b on the cells both have runs at (None when none)."""
    have = [c for c in cells if all(((scores["method"] == m) & (scores["dataset"] == c[0])
                                     & (scores["ratio"] == c[1])).any() for m in (a, b))]
    if not have:
        return None
    (x, _), (y, _) = score_matrix(scores, a, have), score_matrix(scores, b, have)
    return x, y, len(have)


class Improvement:
    """P(a > b) per (cells, a, b), each computed once (the comparisons and runlevel.csv share
    them)."""

    def __init__(self, scores: pd.DataFrame, seed: int, confidence: float = 0.95):
        self.scores, self.seed, self.confidence, self._done = scores, seed, confidence, {}

    def __call__(self, cells: list[tuple], a: str, b: str):
        key = (tuple(cells), a, b)
        if key not in self._done:
            pair = _pair(self.scores, a, b, cells)
            self._done[key] = None if pair is None else (
                *p_improvement(pair[0], pair[1], self.seed, confidence=self.confidence),
                pair[0].shape[0], pair[2])
        return self._done[key]


def summarize(scores: pd.DataFrame, plan: ReportPlan, improvement: Improvement) -> pd.DataFrame:
    """runlevel.csv: Table 1's methods per cell and over all its cells ("all"), the mean and
    IQM with CIs and P(method > baseline / reference) with CIs."""
    g = plan.grid
    scores = scores[scores["dataset"].isin(g.datasets) & scores["ratio"].isin(g.ratios)
                    & scores["method"].isin(g.methods)]
    have = set(zip(scores["dataset"], scores["ratio"]))
    cells = [(d, k) for d in g.datasets for k in g.ratios if (d, k) in have]
    scopes = [("cell", [c]) for c in cells] + ([("all cells", cells)] if len(cells) > 1 else [])
    rows = []
    for scope, where in scopes:
        d, k = (where[0][0], int(where[0][1])) if scope == "cell" else ("all", np.nan)
        for m in order_methods(scores["method"]):
            matrix, note = score_matrix(scores, m, where)
            if matrix.size == 0:
                continue
            base = {"scope": scope, "dataset": d, "ratio": k, "method": m}
            for name, (v, lo, hi) in aggregates(matrix, plan.options.seed,
                                                confidence=plan.options.confidence).items():
                rows.append({**base, "statistic": name, "vs": "", "value": v, "ci_low": lo,
                             "ci_high": hi, "n_runs": matrix.shape[0], "n_tasks": matrix.shape[1],
                             "reps": AGG_REPS, "note": note})
            for other in (plan.baseline, plan.reference):
                hit = improvement(where, m, other) if other != m else None
                if hit is not None:
                    rows.append({**base, "statistic": "p_improvement", "vs": other,
                                 "value": hit[0], "ci_low": hit[1], "ci_high": hit[2],
                                 "n_runs": hit[3], "n_tasks": hit[4], "reps": POI_REPS,
                                 "note": ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def add_improvement(comparisons: pd.DataFrame, improvement: Improvement) -> pd.DataFrame:
    """p_improvement (rliable's P(a > b) over the runs of the comparison's cell) with its CI."""
    out = comparisons.copy()
    values = [improvement([(r.dataset, int(r.ratio))], r.a, r.b) if pd.notna(r.p) else None
              for r in comparisons.itertuples()]
    for i, name in enumerate(("p_improvement", "p_improvement_low", "p_improvement_high")):
        out[name] = [np.nan if v is None else v[i] for v in values]
    return out
