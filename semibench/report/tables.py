"""Table 1 (``grid``) and Table 2 (``ablation``): tidy CSV, Markdown, LaTeX (booktabs) and HTML.

What one run contributes: by default its **per-image mean** (``metrics.json["per_image_mean"]``,
every metric on each test sample, then averaged); ``convention="pooled"`` takes the pooled
values (confusion counts summed over the test set). A cell is the mean ± **sample** standard
deviation (ddof = 1) over seeds, printed in percent with 2 decimals as the paper prints it
(no ± with one seed).

Bold = best shown (rounded) mean per column among the rows that are not FullSup (ties all bold;
bold means "highest mean", not "significant"). Marks on the tested metric (Dice) come from the
declared test families (semibench.report.stats), in both directions (Holm-adjusted p < alpha;
the direction is the test's, the sign of the rank-biserial r): † / § = significantly below /
above the reference method, ‡ / ¶ = significantly above / below the baseline. A cell whose run(s)
are missing shows "—"; a cell with fewer seeds than configured shows its n.
"""
from __future__ import annotations

import html
import math

import pandas as pd

from semibench.errors import ConfigError

from .plan import BEYOND_MARK, UPPER_BOUND, ReportPlan, Section, beyond_paper, display, method_facts, order_methods
from .read import Results

BELOW, ABOVE, MISSING = "†", "‡", "—"  # below the reference, above the baseline (the paper's)
ABOVE_REF, BELOW_BASE = "§", "¶"  # the other directions
MARK_ORDER = (BELOW, ABOVE_REF, ABOVE, BELOW_BASE)
LATEX_MARKS = {BELOW: r"$^{\dagger}$", ABOVE: r"$^{\ddagger}$", ABOVE_REF: r"$^{\S}$",
               BELOW_BASE: r"$^{\P}$"}
TIDY_COLUMNS = ["table", "dataset", "ratio", "method", "metric", "mean", "std", "n_seeds",
                "n_expected", "bold", "mark"]


def ratio_label(ratio: int) -> str:
    return "100%" if int(ratio) == 1 else f"1/{int(ratio)}"


def summarize(results: Results, convention: str = "per_image_mean") -> pd.DataFrame:
    """Mean and sample std over seeds per (dataset, ratio, method, metric)."""
    runs = results.runs[results.runs["convention"] == convention]
    g = runs.groupby(["dataset", "ratio", "method", "metric"], sort=False)["value"]
    out = pd.concat([g.mean().rename("mean"), g.std(ddof=1).rename("std"),
                     g.size().rename("n_seeds")], axis=1).reset_index()
    return out


def _mark_lookup(comparisons: pd.DataFrame | None, plan: ReportPlan) -> dict:
    """(dataset, ratio, method) -> marks, from the significant rows of the declared families."""
    marks: dict = {}
    if comparisons is None or comparisons.empty:
        return marks
    sig = comparisons[comparisons["significant"].fillna(False).astype(bool)]
    for r in sig.itertuples():
        key = (r.dataset, int(r.ratio), r.a)
        up = r.rbc > 0 if pd.notna(r.rbc) and r.rbc != 0 else r.delta > 0  # the test's direction
        if r.b == plan.reference and r.family in ("vs_reference", "ablation"):
            marks.setdefault(key, set()).add(ABOVE_REF if up else BELOW)
        if r.b == plan.baseline and r.family == "vs_baseline":
            marks.setdefault(key, set()).add(ABOVE if up else BELOW_BASE)
    return marks


def _marks_text(marks: set) -> str:
    return "".join(m for m in MARK_ORDER if m in marks)


def build_table(summary: pd.DataFrame, section: Section, metrics: list[str], plan: ReportPlan,
                comparisons: pd.DataFrame | None, table: str, higher_is_better=None
                ) -> pd.DataFrame:
    """The tidy table: every configured cell (missing ones with NaN mean), bold and marks."""
    higher_is_better = higher_is_better or {}
    index = summary.set_index(["dataset", "ratio", "method", "metric"])
    marks = _mark_lookup(comparisons, plan)
    rows = []
    for d in section.datasets:
        for m in section.methods:
            ratios = (1,) if m == UPPER_BOUND else section.ratios
            for k in ratios:
                for metric in metrics:
                    key = (d, int(k), m, metric)
                    hit = index.loc[key] if key in index.index else None
                    rows.append({"table": table, "dataset": d, "ratio": int(k), "method": m,
                                 "metric": metric,
                                 "mean": float(hit["mean"]) if hit is not None else math.nan,
                                 "std": float(hit["std"]) if hit is not None else math.nan,
                                 "n_seeds": int(hit["n_seeds"]) if hit is not None else 0,
                                 "n_expected": len(section.seeds),
                                 "mark": _marks_text(marks.get((d, int(k), m), set()))
                                 if metric == plan.metric else ""})
    frame = pd.DataFrame(rows, columns=[c for c in TIDY_COLUMNS if c != "bold"])
    # bold on the shown numbers: the mean in percent rounded to 2 decimals
    shown = (frame["mean"] * 100).round(2)
    frame["bold"] = False
    candidates = frame[(frame["method"] != UPPER_BOUND) & shown.notna()]
    for (_dataset, _ratio, metric), idx in candidates.groupby(["dataset", "ratio", "metric"]).groups.items():
        values = shown.loc[idx]
        best = values.max() if higher_is_better.get(metric, True) else values.min()
        frame.loc[values.index[values == best], "bold"] = True
    return frame[TIDY_COLUMNS]


def cell_text(row, latex: bool = False) -> str:
    """"87.49 ± 0.12" (percent), bold and marks in the target syntax; "—" when missing."""
    if row["n_seeds"] == 0 or math.isnan(row["mean"]):
        return "---" if latex else MISSING
    pm = r" $\pm$ " if latex else " ± "
    text = f"{row['mean'] * 100:.2f}"
    if row["n_seeds"] > 1:
        text += f"{pm}{row['std'] * 100:.2f}"
    if row["bold"]:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    for mark in row["mark"]:
        text += LATEX_MARKS[mark] if latex else mark
    if 0 < row["n_seeds"] < row["n_expected"]:
        text += rf" {{\scriptsize(n={row['n_seeds']})}}" if latex else f" (n={row['n_seeds']})"
    return text


def _grid(frame: pd.DataFrame, dataset: str, abbrev, latex: bool = False, html_mode: bool = False):
    """Rows (method) x columns ((ratio, metric)) of cell texts for one dataset. FullSup (ratio 1)
    is shown in every ratio group, as the paper's 100 % row."""
    part = frame[frame["dataset"] == dataset]
    ratios = list(dict.fromkeys(part.loc[part["method"] != UPPER_BOUND, "ratio"])) or [1]
    metrics = list(dict.fromkeys(part["metric"]))
    methods = list(dict.fromkeys(part["method"]))
    cells = {}
    for row in part.to_dict("records"):
        text = _html_cell(row) if html_mode else cell_text(row, latex)
        for k in (ratios if row["method"] == UPPER_BOUND else [row["ratio"]]):
            cells[(row["method"], k, row["metric"])] = text
    body = [[cells.get((m, k, metric), MISSING) for k in ratios for metric in metrics]
            for m in methods]
    return methods, ratios, metrics, body


def _html_cell(row) -> str:
    text = html.escape(cell_text(dict(row, bold=False, mark="")))
    if row["bold"]:
        text = f"<b>{text}</b>"
    return text + "".join(f"<sup>{m}</sup>" for m in row["mark"])


def std_ci_factors(n_seeds: int) -> tuple[float, float]:
    """95 % CI of sigma as multiples of the sample std s with n seeds (chi-square quantiles)."""
    from scipy.stats import chi2

    df = n_seeds - 1
    return math.sqrt(df / chi2.ppf(0.975, df)), math.sqrt(df / chi2.ppf(0.025, df))


def seeds_text(n_seeds_found) -> str:
    """What the seed count means for the stds, from the seeds found per cell (not configured)."""
    found = sorted({int(n) for n in n_seeds_found if n > 0})
    if not found:
        return ""
    if found == [1]:
        return "One seed per cell: no spread. "
    parts = []
    for n in found:
        if n >= 2:
            lo, hi = std_ci_factors(n)
            parts.append(f"{lo:.2f}·s to {hi:.1f}·s" if len(found) == 1
                         else f"{n} seeds: {lo:.2f}·s to {hi:.1f}·s")
    few = "; one seed in some cells (no spread there)" if found[0] == 1 else ""
    head = f"With {found[0]} seeds" if len(found) == 1 else \
        f"With {found[0]}–{found[-1]} seeds per cell (n shown where fewer than configured)"
    return (f"{head} the std is imprecise (95 % CI of σ: {', '.join(parts)}{few}); where the "
            f"test set is re-drawn per seed (DSB) it mixes training and test-sampling variance. ")


def footnote(plan: ReportPlan, n_cases: dict, families: list[str], abbrev, upper_bound: bool = True,
             n_seeds_found=(3,), notes=(), pre_gate=()) -> str:
    """n, the test, the correction and the marks, the seeds found, and what was left out, as
    the table footnote (plain text)."""
    ns = ", ".join(f"n = {n} ({d})" for d, n in n_cases.items()) or "n unknown"
    bold = (f"bold = best shown mean per column among non-{display(UPPER_BOUND)} rows (ties all "
            f"bold; {display(UPPER_BOUND)} uses all labels and is an upper bound, shown in every "
            f"group)" if upper_bound else "bold = best shown mean per column (ties all bold)")
    metric = abbrev(plan.metric)
    marks = []
    if any(f in families for f in ("vs_reference", "ablation")):
        marks.append(f"{BELOW} / {ABOVE_REF} {metric} significantly below / above "
                     f"{display(plan.reference)}")
    if "vs_baseline" in families or any(f.startswith("vs_baseline") for f in families):
        marks.append(f"{ABOVE} / {BELOW_BASE} significantly above / below "
                     f"{display(plan.baseline)}")
    if marks:
        test = (f"{'; '.join(marks)} (two-sided paired Wilcoxon signed-rank on per-source-image "
                f"{metric} averaged over seeds, an image with no difference counting half to "
                f"each side; direction = the test's (rank-biserial r); {ns} source images; Holm "
                f"within each family ({', '.join(families)}) and dataset; "
                f"α = {plan.options.alpha}). ")
    else:
        test = "No significance test in this table. "
    left = f"Left out: {'; '.join(notes)}. " if notes else ""
    gate = (f"Selected (best validation epoch) before the unsupervised losses start, so scored "
            f"with a network that never trained on an unlabeled image: {'; '.join(pre_gate)}. "
            if pre_gate else "")
    return (f"Cells: mean ± sample std (ddof = 1) over seeds, in %; {bold}. {test}"
            f"{seeds_text(n_seeds_found)}{MISSING} = run missing. {left}{gate}"
            f"Tests are conditional on these runs and this test set.")


def beyond_paper_note(methods) -> str:
    """The footnote sentence for rows that are not in the CDCL paper's tables ("" if none)."""
    shown = [display(m) for m in order_methods(methods) if beyond_paper(m)]
    if not shown:
        return ""
    names = ", ".join(s.rstrip(BEYOND_MARK) for s in shown)
    return (f" {BEYOND_MARK} Not in the CDCL paper's tables: {names}, on the same network, data, "
            f"splits and engine (no paper numbers to compare with).")


def unlabeled_note(results: Results, datasets) -> str:
    """The unlabeled images each ratio's runs had, for datasets with an unlabeled pool (a folder
    dataset's ``unlabeled``: its ratio-1 runs have some); "" if none. Read from train_done."""
    have: dict[str, dict[int, int]] = {}
    for (d, _m, k, _s), (_e, _start, n, _per_step) in results.selected.items():
        have.setdefault(d, {})[k] = max(n, have.get(d, {}).get(k, 0))
    parts = [f"{d} " + ", ".join(f"{ratio_label(k)}: {n}" for k, n in sorted(have[d].items(), reverse=True))
             for d in datasets if have.get(d, {}).get(1)]
    if not parts:
        return ""
    return (f" Unlabeled images available to the semi-supervised runs (hidden-label training "
            f"images plus the unlabeled pool): {'; '.join(parts)}.")


def render_markdown(frame: pd.DataFrame, title: str, note: str, abbrev) -> str:
    out = [f"# {title}", ""]
    for dataset in dict.fromkeys(frame["dataset"]):
        methods, ratios, metrics, body = _grid(frame, dataset, abbrev)
        header = ["method"] + [f"{ratio_label(k)} {abbrev(m)}" for k in ratios for m in metrics]
        out += [f"## {dataset}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
        for m, cells in zip(methods, body):
            out.append(f"| {display(m)} | " + " | ".join(cells) + " |")
        out.append("")
    out += [note, ""]
    return "\n".join(out)


def _tex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%") \
        .replace("_", r"\_").replace("#", r"\#")


def render_latex(frame: pd.DataFrame, title: str, note: str, abbrev, label: str) -> str:
    """One booktabs tabular per dataset: a multicolumn ratio header over the metric columns."""
    out = [f"% {title} (semibench report; needs \\usepackage{{booktabs}})"]
    for dataset in dict.fromkeys(frame["dataset"]):
        methods, ratios, metrics, body = _grid(frame, dataset, abbrev, latex=True)
        nm = len(metrics)
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                rf"\caption{{{_tex_escape(title)}: {_tex_escape(dataset)}}}",
                rf"\label{{{label}-{dataset}}}",
                r"\begin{tabular}{l" + "c" * (nm * len(ratios)) + "}", r"\toprule"]
        out.append("Method & " + " & ".join(
            rf"\multicolumn{{{nm}}}{{c}}{{{_tex_escape(ratio_label(k))}}}" for k in ratios) + r" \\")
        out.append(" ".join(rf"\cmidrule(lr){{{2 + i * nm}-{1 + (i + 1) * nm}}}"
                            for i in range(len(ratios))))
        out.append(" & " + " & ".join(f"{abbrev(m)} (\\%)" for _ in ratios for m in metrics) + r" \\")
        out.append(r"\midrule")
        for m, cells in zip(methods, body):
            if m == UPPER_BOUND:
                out.append(r"\midrule")
            out.append(f"{_tex_escape(display(m))} & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\par\smallskip\parbox{{\linewidth}}{{\footnotesize {_tex_escape(note)}}}".replace(
                    "±", r"$\pm$").replace("†", r"$^{\dagger}$").replace("‡", r"$^{\ddagger}$")
                .replace("α", r"$\alpha$").replace("σ", r"$\sigma$").replace("·", r"$\cdot$")
                .replace("§", r"$^{\S}$").replace("¶", r"$^{\P}$")
                .replace("—", "---").replace("\u2212", "$-$"),
                r"\end{table}", ""]
    return "\n".join(out)


def render_html(frame: pd.DataFrame, title: str, note: str, abbrev) -> str:
    style = ("<style>table.sb{border-collapse:collapse;font:13px sans-serif;margin:1em 0}"
             "table.sb th,table.sb td{padding:3px 7px;text-align:center}"
             "table.sb thead tr:last-child th{border-bottom:1px solid #000}"
             "table.sb{border-top:2px solid #000;border-bottom:2px solid #000}"
             "table.sb tr.upper td{border-top:1px solid #000}"
             "table.sb td:first-child{text-align:left}p.sbnote{font:12px sans-serif;max-width:60em}"
             "</style>")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"{style}</head><body><h2>{html.escape(title)}</h2>"]
    for dataset in dict.fromkeys(frame["dataset"]):
        methods, ratios, metrics, body = _grid(frame, dataset, abbrev, html_mode=True)
        out.append(f"<h3>{html.escape(dataset)}</h3><table class='sb'><thead><tr><th rowspan='2'>"
                   "Method</th>" + "".join(f"<th colspan='{len(metrics)}'>{ratio_label(k)}</th>"
                                           for k in ratios) + "</tr><tr>"
                   + "".join(f"<th>{html.escape(abbrev(m))} (%)</th>" for _ in ratios for m in metrics)
                   + "</tr></thead><tbody>")
        for m, cells in zip(methods, body):
            cls = " class='upper'" if m == UPPER_BOUND else ""
            out.append(f"<tr{cls}><td>{html.escape(display(m))}</td>"
                       + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</tbody></table>")
    out.append(f"<p class='sbnote'>{html.escape(note)}</p></body></html>")
    return "\n".join(out)


def render_all(frame: pd.DataFrame, title: str, note: str, abbrev, label: str) -> dict:
    """{suffix: text} for csv, md, tex, html."""
    tidy = frame.copy()
    return {"csv": tidy.to_csv(index=False, float_format="%.10g"),
            "md": render_markdown(frame, title, note, abbrev),
            "tex": render_latex(frame, title, note, abbrev, label),
            "html": render_html(frame, title, note, abbrev)}


def n_cases_by_dataset(comparisons: pd.DataFrame | None, datasets) -> dict:
    if comparisons is None or comparisons.empty:
        return {}
    tested = comparisons[comparisons["n_cases"] > 0]
    out = {}
    for d in datasets:
        ns = sorted(set(tested.loc[tested["dataset"] == d, "n_cases"].astype(int)))
        if ns:
            out[d] = ns[0] if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return out


def table_metrics(results: Results, section: Section, convention: str,
                  wanted: tuple | None = None) -> list[str]:
    """Metrics shown: ``wanted`` (``report.table1_metrics``) in its order, else the pixel metrics
    of metric_info (the paper's DC/JC/ACC/SP/SE); of those, the ones the section's runs report."""
    runs = results.runs[(results.runs["convention"] == convention)
                        & results.runs["dataset"].isin(section.datasets)
                        & results.runs["method"].isin(section.methods)]
    have = set(runs["metric"])
    if wanted:
        unknown = [m for m in wanted if m not in results.metrics]
        if unknown:
            raise ConfigError(f"report.table1_metrics: {', '.join(map(repr, unknown))} not reported "
                              f"by these runs (they report: {', '.join(results.metrics)})")
        return [m for m in wanted if m in have]
    return [m for m in results.metrics if m in have and results.metrics[m]["kind"] == "pixel"]


def paper_delta(summary: pd.DataFrame, paper1: pd.DataFrame, paper2: pd.DataFrame,
                abbrev_to_metric: dict) -> pd.DataFrame:
    """Ours − paper per cell (percentage points), for the cells both have."""
    from .paper import paper_long

    paper = paper_long(paper1, paper2, abbrev_to_metric)
    ours = summary.assign(ours=summary["mean"] * 100, ours_std=summary["std"] * 100)
    merged = paper.merge(ours[["dataset", "ratio", "method", "metric", "ours", "ours_std", "n_seeds"]],
                         on=["dataset", "ratio", "method", "metric"], how="inner")
    merged["delta"] = merged["ours"] - merged["paper"]
    metric_rank = {m: i for i, m in enumerate(abbrev_to_metric.values())}
    merged["_m"] = merged["method"].map(lambda m: method_facts(m)["report_rank"])
    merged["_x"] = merged["metric"].map(metric_rank)
    return merged.sort_values(["table", "dataset", "ratio", "_m", "_x"],
                              ascending=[True, True, False, True, True],
                              ignore_index=True).drop(columns=["_m", "_x"])


#: the five pixel metrics of runs without metric_info (kept for callers of the old API)
METRICS = ("dice", "jaccard", "accuracy", "specificity", "sensitivity")


def read_table1(path) -> list[dict]:
    """table1.csv back as dicts (ratio and n_seeds int, mean/std float, NaN when missing)."""
    frame = pd.read_csv(path)
    return [dict(r, ratio=int(r["ratio"]), n_seeds=int(r["n_seeds"]), mean=float(r["mean"]),
                 std=float(r["std"])) for r in frame.to_dict("records")]
