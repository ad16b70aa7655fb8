"""``stats/comparisons.md``: the pairwise comparisons, Friedman and the ranking's stability as
Markdown, for a README, a results page or a paper's supplement (``comparisons.html`` holds every
column; this keeps the ones a reader quotes)."""
from __future__ import annotations

import re

import pandas as pd

from .plan import BLOCK_TITLES, ReportPlan, display

FAMILY_TITLES = {"vs_baseline": "against the baseline", "vs_reference": "against the reference",
                 "ablation": "ablation against the reference"}


def _pts(value) -> str:
    return "—" if pd.isna(value) else f"{value * 100:+.2f}"


def _ci(low, high) -> str:
    return "—" if pd.isna(low) else f"[{low * 100:+.2f}, {high * 100:+.2f}]"


def _p(value) -> str:
    return "—" if pd.isna(value) else f"{value:.2g}"


def seed_deltas_points(text) -> str:
    """'s0:+0.013474 s1:-0.002000' (fractions, as in the CSV) -> 's0 +1.35, s1 −0.20' (points)."""
    if not isinstance(text, str) or not text:
        return ""
    return ", ".join(f"{seed} {float(v) * 100:+.2f}" for seed, v in
                     (item.split(":") for item in text.split()))


def value_with_ci(value, low, high) -> str:
    return "—" if pd.isna(value) else f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _reason(note, dataset, ratio) -> str:
    """A 'not tested' note without what the line already says (the pair, the cell) and without
    the lists of image ids (comparisons.csv keeps them)."""
    text = str(note).removeprefix("not tested: ")
    text = text.split(f" on {dataset} 1/{ratio}: ", 1)[-1]
    return re.sub(r" \((?:[0-9a-f]{12,}, )*[0-9a-f]{12,}(?:, \.\.\.)?\)", "", text)


def _int(value) -> str:
    """Seeds needed: a count, '' with one seed, or a text such as '> 20' (kept as it is)."""
    if value is None or value == "" or (isinstance(value, float) and pd.isna(value)):
        return "—"
    try:
        return str(int(float(value)))
    except ValueError:
        return str(value)


def _comparison_rows(group: pd.DataFrame, alpha: float) -> list[str]:
    head = ("| method | vs | n images | Δ (pts) | 95 % CI | two-level CI | p | p Holm | "
            "per-seed Δ | P(improvement) | seeds needed | holds over |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for _, r in group.iterrows():
        holm = _p(r["p_holm"])
        if bool(r["significant"]) and holm != "—":
            holm = f"**{holm}**"
        holds = r["holds_over"] if isinstance(r["holds_over"], str) and r["holds_over"] else "—"
        poi = value_with_ci(r["p_improvement"], r["p_improvement_low"], r["p_improvement_high"])
        lines.append(f"| {display(r['a'])} | {display(r['b'])} | {int(r['n_cases'])} | "
                     f"{_pts(r['delta'])} | {_ci(r['ci_low'], r['ci_high'])} | "
                     f"{_ci(r['two_level_low'], r['two_level_high'])} | {_p(r['p'])} | {holm} | "
                     f"{seed_deltas_points(r['seed_deltas']) or '—'} | {poi} | {_int(r['seeds_needed'])} | "
                     f"{holds} |")
    return lines


def _friedman_line(row) -> str:
    methods = str(row["methods"]).split()
    ranks = sorted(((row.get(f"rank_{m}"), m) for m in methods), key=lambda t: t[0])
    ranked = ", ".join(f"{display(m)} {r:.2f}" for r, m in ranks if not pd.isna(r))
    if pd.isna(row.get("chi2")):
        return f"Friedman over {len(methods)} methods: not computed ({row.get('note')})."
    scope = f"{int(row['n_cases'])} images"
    if isinstance(row.get("note"), str) and row["note"]:  # a subset: say which, without the id lists
        scope = row["note"].split(":")[0]
    return (f"Friedman over {len(methods)} methods on {scope.removeprefix('on ')}: "
            f"χ² = {row['chi2']:.1f}, p = {row['p']:.2g}, Kendall's W = {row['kendall_w']:.3f}; "
            f"mean ranks (1 = best) {ranked}.")


def _ranking_line(group: pd.DataFrame) -> str:
    first = group[group["winner_freq"] > 0].sort_values("winner_freq", ascending=False)
    n_boot = int(group["n_boot"].iloc[0])
    winners = ", ".join(f"{display(m)} {f:.0%}" for m, f in zip(first["method"], first["winner_freq"]))
    return (f"Ranked by mean over {n_boot} bootstrap resamples of the images, first: {winners} "
            f"(Kendall's τ of the resampled ranking with the full one: "
            f"{group['kendall_tau'].iloc[0]:.3f}).")


def _rows_of(frame: pd.DataFrame, dataset: str, ratio: int, block: str) -> pd.DataFrame:
    if not len(frame):
        return frame
    return frame[(frame["dataset"] == dataset) & (frame["ratio"] == ratio)
                 & (frame["block"] == block)]


def _blocks(friedman: pd.DataFrame, ranking: pd.DataFrame, dataset: str, ratio: int) -> list[str]:
    """The cell's all-at-once views (build._blocks), in the order computed."""
    found = [f[(f["dataset"] == dataset) & (f["ratio"] == ratio)]["block"]
             for f in (friedman, ranking) if len(f)]
    return list(dict.fromkeys(b for col in found for b in col))


def comparisons_markdown(frames: dict, plan: ReportPlan, abbrev) -> str:
    """Markdown of ``compute_stats``'s frames: per dataset and ratio, one table per family,
    the comparisons that could not be paired (with why), Friedman and the ranking's stability."""
    comparisons, friedman, ranking = frames["comparisons"], frames["friedman"], frames["ranking"]
    metric = abbrev(plan.metric)
    o = plan.options
    out = ["# Statistics: pairwise comparisons", "",
           f"Δ = method − vs in {metric} points (×100), the mean over source images of each image's "
           f"difference (an image's value: its mean over the seeds whose test set holds it); 95 % "
           f"BCa bootstrap CI over images. p: two-sided paired Wilcoxon signed-rank; p Holm within "
           f"family and dataset, bold below {o.alpha}. Two-level CI: seeds resampled, then images "
           f"within each seed (a claim over training runs when it excludes 0). P(improvement): "
           f"probability that a run of the method beats a run of the other, with its bootstrap CI "
           f"over runs. Every column is explained in comparisons.html."]
    cells = list(dict.fromkeys(zip(comparisons["dataset"], comparisons["ratio"]))) if len(comparisons) else []
    for dataset, ratio in cells:
        out += ["", f"## {dataset} 1/{ratio}"]
        cell = comparisons[(comparisons["dataset"] == dataset) & (comparisons["ratio"] == ratio)]
        for family in dict.fromkeys(cell["family"]):
            rows = cell[cell["family"] == family]
            tested = rows[rows["delta"].notna()]
            untested = rows[rows["delta"].isna()]
            out += ["", f"**{dataset} 1/{ratio}, {FAMILY_TITLES.get(family, family)}**", ""]
            out += _comparison_rows(tested, o.alpha) if len(tested) else ["No comparison could be paired."]
            if len(untested):
                out += ["", "Not tested:"] + [f"- {display(r['a'])} vs {display(r['b'])}: "
                                              f"{_reason(r['note'], dataset, ratio)}"
                                              for _, r in untested.iterrows()]
        for block in _blocks(friedman, ranking, dataset, ratio):
            f_rows = _rows_of(friedman, dataset, ratio, block)
            r_rows = _rows_of(ranking, dataset, ratio, block)
            lines = [_friedman_line(row) for _, row in f_rows.iterrows()]
            lines += [_ranking_line(r_rows)] if len(r_rows) else []
            out += ["", f"**{dataset} 1/{ratio}, {BLOCK_TITLES.get(block, block)}, all at once**"]
            out += [line for text in lines for line in ("", text)]
    return "\n".join(out) + "\n"
