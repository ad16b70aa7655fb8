"""``tables/paper_gains.csv`` and ``paper_gains.md``: each method's gain over the baseline
(SupOnly), ours beside the paper's.

``paper_delta`` sets our absolute numbers against the paper's, which differ by network,
schedule and weights, and only where both have the cell. What a reader can carry from one
setting to the other is the gain over SupOnly trained the same way, and the order of the
methods by it; the paper reports those at 1/32, 1/16 and 1/8, a study may run other ratios.
Ours: the mean over the seeds both runs have of (method − baseline), on the primary metric and
convention; FullSup's row is the headroom (FullSup at 1/1 − baseline at the ratio)."""
from __future__ import annotations

import pandas as pd
from scipy.stats import kendalltau

from .paper import paper_long
from .plan import UPPER_BOUND, ReportPlan, display, order_methods
from .read import Results

COLUMNS = ["dataset", "method", "source", "ratio", "gain", "n_seeds", "value", "baseline_value"]


def _ours(results: Results, plan: ReportPlan, methods: list[str]) -> list[dict]:
    runs = results.runs[(results.runs["convention"] == plan.convention)
                        & (results.runs["metric"] == plan.metric)].dropna(subset=["value"])
    value = {(r.dataset, r.method, int(r.ratio), r.seed): float(r.value) for r in runs.itertuples()
             if plan.trained is None or (r.dataset, r.method, int(r.ratio), r.seed) in plan.trained}
    rows = []
    for dataset in plan_datasets(plan):
        ratios = sorted({k[2] for k in value if k[0] == dataset and k[1] == plan.baseline},
                        reverse=True)
        for ratio in ratios:
            base = {k[3]: v for k, v in value.items() if k[:3] == (dataset, plan.baseline, ratio)}
            for method in methods:
                at = 1 if method == UPPER_BOUND else ratio
                mine = {k[3]: v for k, v in value.items() if k[:3] == (dataset, method, at)}
                seeds = sorted(set(mine) & set(base))
                if not seeds:
                    continue
                m = sum(mine[s] for s in seeds) / len(seeds)
                b = sum(base[s] for s in seeds) / len(seeds)
                rows.append(dict(dataset=dataset, method=method, source="ours", ratio=ratio,
                                 gain=(m - b) * 100, n_seeds=len(seeds), value=m * 100,
                                 baseline_value=b * 100))
    return rows


def _paper(plan: ReportPlan, paper1: pd.DataFrame, paper2: pd.DataFrame, abbrev: str,
           methods: list[str]) -> list[dict]:
    long = paper_long(paper1, paper2, {abbrev: plan.metric})
    long = long[long["metric"] == plan.metric].drop_duplicates(["dataset", "ratio", "method"])
    cell = {(r.dataset, r.method, int(r.ratio)): float(r.paper) for r in long.itertuples()}
    rows = []
    for dataset in plan_datasets(plan):
        for ratio in sorted({k[2] for k in cell if k[0] == dataset and k[1] == plan.baseline
                             and k[2] != 1}, reverse=True):
            b = cell[(dataset, plan.baseline, ratio)]
            for method in methods:
                m = cell.get((dataset, method, 1 if method == UPPER_BOUND else ratio))
                if m is not None:
                    rows.append(dict(dataset=dataset, method=method, source="paper", ratio=ratio,
                                     gain=m - b, n_seeds=None, value=m, baseline_value=b))
    return rows


def plan_datasets(plan: ReportPlan) -> list[str]:
    sections = [s for s in (plan.grid, plan.ablation) if s is not None]
    return list(dict.fromkeys(d for s in sections for d in s.datasets))


def plan_methods(plan: ReportPlan) -> list[str]:
    """Both tables' rows but the baseline, in the tables' order (schemes after Table 1's)."""
    sections = [s for s in (plan.grid, plan.ablation) if s is not None]
    return [m for m in order_methods(m for s in sections for m in s.methods) if m != plan.baseline]


def paper_gains(results: Results, plan: ReportPlan, paper1: pd.DataFrame,
                paper2: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, source, ratio): the gain over the baseline in points."""
    methods = plan_methods(plan)
    rows = _ours(results, plan, methods) + _paper(plan, paper1, paper2,
                                                  results.abbrev(plan.metric), methods)
    return pd.DataFrame(rows, columns=COLUMNS)


def order_agreement(gains: pd.DataFrame, dataset: str) -> dict | None:
    """Our scarcest ratio against the paper's: Kendall's τ of the methods' gains and how many
    gain at all, over the methods both have (FullSup left out); None below three methods."""
    g = gains[(gains["dataset"] == dataset) & (gains["method"] != UPPER_BOUND)]
    ours, paper = g[g["source"] == "ours"], g[g["source"] == "paper"]
    if ours.empty or paper.empty:
        return None
    ours = ours[ours["ratio"] == ours["ratio"].max()].set_index("method")["gain"]
    paper = paper[paper["ratio"] == paper["ratio"].max()].set_index("method")["gain"]
    both = [m for m in ours.index if m in paper.index]
    if len(both) < 3:
        return None
    tau = kendalltau([ours[m] for m in both], [paper[m] for m in both]).statistic
    return dict(ours_ratio=int(g[g["source"] == "ours"]["ratio"].max()),
                paper_ratio=int(g[g["source"] == "paper"]["ratio"].max()), methods=both, tau=tau,
                ours_positive=sum(ours[m] > 0 for m in both),
                paper_positive=sum(paper[m] > 0 for m in both))


def _fmt(gain: float) -> str:
    return f"{gain:+.2f}"


def paper_gains_markdown(gains: pd.DataFrame, plan: ReportPlan, abbrev) -> str:
    metric = abbrev(plan.metric)
    out = ["# Gains over the baseline: ours beside the paper's", "",
           f"{metric} of each method − {display(plan.baseline)}'s, in points. Ours: the mean over "
           f"the seeds both have ({plan.convention}); (n=k) where fewer seeds than the most in "
           f"that column. Paper: CDCL CVPR 2022 Tables 1 and 2 (semibench/report/paper_tables), "
           f"Table 2 at 1/32. FullSup: FullSup − {display(plan.baseline)} at that ratio, the "
           f"headroom. — = not run yet (ours) or no such row in the paper's tables. The settings "
           f"differ (network, schedule, weights, label ratio); compare the gains and their order, "
           f"not the absolute numbers."]
    methods = plan_methods(plan)
    for dataset in plan_datasets(plan):
        g = gains[gains["dataset"] == dataset]
        cols = [("ours", r) for r in sorted(g.loc[g["source"] == "ours", "ratio"].unique(),
                                               reverse=True)] + \
               [("paper", r) for r in sorted(g.loc[g["source"] == "paper", "ratio"].unique(),
                                             reverse=True)]
        if not cols:
            continue
        most = {c: g[(g["source"] == c[0]) & (g["ratio"] == c[1])]["n_seeds"].max() for c in cols}
        out += ["", f"## {dataset}", "",
                "| method | " + " | ".join(f"{s} 1/{r}" for s, r in cols) + " |",
                "|---|" + "---|" * len(cols)]
        for method in methods:
            cells = []
            for col in cols:
                hit = g[(g["method"] == method) & (g["source"] == col[0]) & (g["ratio"] == col[1])]
                if hit.empty:
                    cells.append("—")
                    continue
                row = hit.iloc[0]
                text = _fmt(row["gain"])
                if col[0] == "ours" and row["n_seeds"] < most[col]:
                    text += f" (n={int(row['n_seeds'])})"
                cells.append(text)
            out.append(f"| {display(method)} | " + " | ".join(cells) + " |")
        agree = order_agreement(gains, dataset)
        if agree:
            out += ["", f"Ours at 1/{agree['ours_ratio']} against the paper at "
                        f"1/{agree['paper_ratio']}, over the {len(agree['methods'])} methods both "
                        f"have (FullSup left out): Kendall's τ of the gains = {agree['tau']:.2f}; "
                        f"a gain above 0 for {agree['ours_positive']} of them here and "
                        f"{agree['paper_positive']} in the paper."]
    return "\n".join(out) + "\n"
